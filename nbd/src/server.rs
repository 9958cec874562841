//! Server configuration, worker threads, shutdown.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::{FutureExt, StreamExt};
use tables::{DeviceRef, IoError};

use crate::conn::{set_pool_limit, transmit, ExportView, MAX_PAYLOAD};
use crate::handshake::{handshake, options, Outcome};
use crate::limits::{Budget, Clock, Limits};
use crate::proto::*;
use crate::sock::{shutdown, RecvBuf};
use crate::supervisor::supervisor;
pub(crate) use crate::supervisor::ConnEntry;
use crate::tls::{Tls, TlsMode};

/// Errors starting or stopping a server.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The builder got no export.
    #[error("no exports configured: add one with ServerBuilder::export")]
    NoExports,
    /// Two exports share a name.
    #[error("export '{0}' is defined twice")]
    DuplicateExport(String),
    /// An export name or description the protocol cannot carry.
    #[error("export '{name}': {why}")]
    BadExport {
        /// The export name.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// Binding or configuring a listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address or path.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A worker thread or its io_uring could not be created.
    #[error("cannot start NBD worker thread {index}: {source}")]
    Worker {
        /// Worker number.
        index: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A worker thread panicked.
    #[error("NBD worker thread {0} panicked")]
    WorkerPanicked(usize),
    /// The resource limits are not usable.
    #[error("bad NBD server limits: {0}")]
    BadLimits(String),
    /// Shutdown gave up waiting: connections whose device requests never completed, or
    /// worker threads that did not stop, were left behind (their sockets are closed).
    #[error(
        "NBD shutdown timed out: {connections} connection(s) and {workers} worker thread(s) \
         did not finish (a device request that never completes?)"
    )]
    ShutdownTimedOut {
        /// Connections still registered.
        connections: usize,
        /// Worker threads still running.
        workers: usize,
    },
    /// Flushing an export at shutdown failed.
    #[error("flushing export '{export}' at shutdown: {source}")]
    Flush {
        /// The export name.
        export: String,
        /// The device error.
        #[source]
        source: IoError,
    },
}

/// One configured export.
pub(crate) struct ExportEntry {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) dev: DeviceRef,
    pub(crate) read_only: bool,
}

impl ExportEntry {
    pub(crate) fn size(&self) -> u64 {
        self.dev.size().0
    }

    fn is_read_only(&self) -> bool {
        self.read_only || self.dev.limits().read_only
    }

    pub(crate) fn transmission_flags(&self) -> u16 {
        let l = self.dev.limits();
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        if self.is_read_only() {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_WRITE_ZEROES;
            if l.write_zeroes {
                f |= TFLAG_SEND_FAST_ZERO;
            }
            if l.discard_granularity > 0 {
                f |= TFLAG_SEND_TRIM;
            }
        }
        if l.multi_conn_safe {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        f
    }

    /// (minimum, preferred, maximum) block sizes for `NBD_INFO_BLOCK_SIZE`.
    pub(crate) fn block_sizes(&self) -> (u32, u32, u32) {
        let l = self.dev.limits();
        // The protocol wants powers of two, minimum at most 64 KiB.
        let pow2 = |v: u32| {
            if v.is_power_of_two() {
                v
            } else {
                v.next_power_of_two()
            }
        };
        let min = pow2(l.logical_block_size.clamp(1, 64 << 10));
        let pref = pow2(if l.physical_block_size > 0 {
            l.physical_block_size
        } else {
            4096
        })
        .clamp(min.max(512), 32 << 20);
        (min, pref, MAX_PAYLOAD)
    }

    fn view(&self) -> ExportView {
        let l = self.dev.limits();
        ExportView {
            name: self.name.clone(),
            dev: self.dev.clone(),
            size: self.size(),
            read_only: self.is_read_only(),
            discard: l.discard_granularity > 0,
            native_zeroes: l.write_zeroes,
            native_fua: l.fua,
            max_io: if l.max_io == 0 {
                usize::MAX
            } else {
                l.max_io as usize
            },
        }
    }
}

/// Builds a [`Server`].
pub struct ServerBuilder {
    exports: Vec<ExportEntry>,
    threads: usize,
    limits: Limits,
    shutdown_grace: Duration,
    tls: Option<Tls>,
}

impl ServerBuilder {
    /// Adds an export. Clients name it in `NBD_OPT_GO`; the empty name selects the first
    /// export added. It is read-only if the device's limits say so.
    pub fn export(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        dev: DeviceRef,
    ) -> ServerBuilder {
        self.exports.push(ExportEntry {
            name: name.into(),
            description: description.into(),
            dev,
            read_only: false,
        });
        self
    }

    /// Adds an export that refuses writes (`EPERM`) whatever the device allows.
    pub fn export_read_only(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        dev: DeviceRef,
    ) -> ServerBuilder {
        self.exports.push(ExportEntry {
            name: name.into(),
            description: description.into(),
            dev,
            read_only: true,
        });
        self
    }

    /// Number of worker threads, each with its own io_uring (default: CPUs, at most 4).
    pub fn threads(mut self, n: usize) -> ServerBuilder {
        self.threads = n.max(1);
        self
    }

    /// All resource limits at once (see [`Limits`] for the defaults).
    pub fn limits(mut self, limits: Limits) -> ServerBuilder {
        self.limits = limits;
        self
    }

    /// How long a client may take to finish the handshake (default 30 s; zero: forever).
    /// Sets [`Limits::handshake_timeout_ms`].
    pub fn handshake_timeout(mut self, d: Duration) -> ServerBuilder {
        self.limits.handshake_timeout_ms = millis(d);
        self
    }

    /// Closes a connection with no request in flight that received nothing for `d`
    /// (default: never). Sets [`Limits::idle_timeout_ms`].
    pub fn idle_timeout(mut self, d: Duration) -> ServerBuilder {
        self.limits.idle_timeout_ms = millis(d);
        self
    }

    /// At shutdown, how long connections get to finish their in-flight requests before
    /// their sockets are shut down outright (default 5 s).
    pub fn shutdown_grace(mut self, d: Duration) -> ServerBuilder {
        self.shutdown_grace = d;
        self
    }

    /// Connections open at once; further clients are closed right after `accept` (default
    /// 1024). Sets [`Limits::max_connections`].
    pub fn max_connections(mut self, n: usize) -> ServerBuilder {
        self.limits.max_connections = n.max(1);
        self
    }

    /// Offers (`TlsMode::On`) or requires (`TlsMode::Require`) TLS with these credentials
    /// (see [`Tls::load`]); `TlsMode::Off` or no call: plain only.
    pub fn tls(mut self, tls: Tls) -> ServerBuilder {
        self.tls = (tls.mode != TlsMode::Off).then_some(tls);
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Server, NbdError> {
        if self.exports.is_empty() {
            return Err(NbdError::NoExports);
        }
        self.limits.validate().map_err(NbdError::BadLimits)?;
        let mut seen = std::collections::HashSet::new();
        for e in &self.exports {
            if !seen.insert(e.name.as_str()) {
                return Err(NbdError::DuplicateExport(e.name.clone()));
            }
            for (what, s) in [("name", &e.name), ("description", &e.description)] {
                if s.len() > MAX_STRING {
                    return Err(NbdError::BadExport {
                        name: e.name.clone(),
                        why: format!("{what} is {} bytes (limit {MAX_STRING})", s.len()),
                    });
                }
                if s.contains('\0') {
                    return Err(NbdError::BadExport {
                        name: e.name.clone(),
                        why: format!("{what} contains a NUL byte"),
                    });
                }
            }
        }
        Ok(Server {
            exports: self.exports,
            threads: self.threads,
            limits: self.limits,
            shutdown_grace: self.shutdown_grace,
            tls: self.tls,
        })
    }
}

/// A duration in whole milliseconds (a nonzero one is at least 1 ms).
fn millis(d: Duration) -> u64 {
    match u64::try_from(d.as_millis()) {
        Ok(0) if !d.is_zero() => 1,
        Ok(ms) => ms,
        Err(_) => u64::MAX,
    }
}

/// A configured NBD server, not yet listening. See the crate documentation.
pub struct Server {
    exports: Vec<ExportEntry>,
    threads: usize,
    limits: Limits,
    shutdown_grace: Duration,
    tls: Option<Tls>,
}

/// A bound listening socket to serve on.
pub enum Listener {
    /// TCP (every accepted socket gets `TCP_NODELAY`).
    Tcp(TcpListener),
    /// A Unix stream socket; the path is removed at shutdown.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    pub(crate) fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }

    fn set_nonblocking(&self) -> io::Result<()> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(true),
            Listener::Unix(l, _) => l.set_nonblocking(true),
        }
    }

    fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "tcp".into()),
            Listener::Unix(_, p) => p.display().to_string(),
        }
    }
}

impl Server {
    /// Starts configuring a server.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            exports: Vec::new(),
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2)
                .min(4),
            limits: Limits::default(),
            shutdown_grace: Duration::from_secs(5),
            tls: None,
        }
    }

    /// Listens on a TCP address (port 0 picks a free port: see [`ServerHandle::local_addr`]).
    pub fn serve_tcp(self, addr: impl ToSocketAddrs) -> Result<ServerHandle, NbdError> {
        let addrs: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|e| NbdError::Listen {
                addr: "(unresolved)".into(),
                source: e,
            })?
            .collect();
        let l = TcpListener::bind(&addrs[..]).map_err(|e| NbdError::Listen {
            addr: format!("{addrs:?}"),
            source: e,
        })?;
        self.serve(vec![Listener::Tcp(l)])
    }

    /// Listens on a Unix socket at `path` (an existing socket file there is replaced).
    pub fn serve_unix(self, path: impl AsRef<Path>) -> Result<ServerHandle, NbdError> {
        let path = path.as_ref().to_path_buf();
        let err = |e| NbdError::Listen {
            addr: path.display().to_string(),
            source: e,
        };
        if let Ok(md) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if md.file_type().is_socket() {
                std::fs::remove_file(&path).map_err(err)?;
            }
        }
        let l = UnixListener::bind(&path).map_err(err)?;
        self.serve(vec![Listener::Unix(l, path)])
    }

    /// Serves on already bound listeners (e.g. TCP and Unix at once).
    pub fn serve(self, listeners: Vec<Listener>) -> Result<ServerHandle, NbdError> {
        if listeners.is_empty() {
            return Err(NbdError::Listen {
                addr: "(none)".into(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "no listeners given"),
            });
        }
        for l in &listeners {
            l.set_nonblocking().map_err(|e| NbdError::Listen {
                addr: l.describe(),
                source: e,
            })?;
        }
        let local_addr = listeners.iter().find_map(|l| match l {
            Listener::Tcp(t) => t.local_addr().ok(),
            _ => None,
        });
        // SAFETY: eventfd returns a new descriptor or -1.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(NbdError::Worker {
                index: usize::MAX,
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: efd is a fresh descriptor that nothing else owns.
        let stop_fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let clock = Clock::new();
        let mut workers = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..self.threads {
            let (tx, rx) = mpsc::unbounded();
            workers.push(Slot {
                tx,
                load: AtomicUsize::new(0),
                alive: AtomicBool::new(true),
                beat: AtomicU64::new(clock.now()),
            });
            receivers.push(rx);
        }
        let l = self.limits;
        // `validate` checked that both fit in usize.
        let budget = usize::try_from(l.memory_budget_bytes).unwrap_or(usize::MAX);
        let shared = Arc::new(Shared {
            exports: self.exports,
            limits: l,
            max_requests_per_connection: l.max_requests_per_connection,
            max_bytes_per_connection: usize::try_from(l.max_bytes_per_connection)
                .unwrap_or(usize::MAX),
            budget: Arc::new(Budget::new(budget)),
            clock,
            listeners,
            workers,
            next_worker: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            stop_fd,
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            total: AtomicU64::new(0),
            stop_lock: Mutex::new(false),
            stop_cv: Condvar::new(),
            tls: self.tls.clone(),
        });
        let mut handle = ServerHandle {
            shared: shared.clone(),
            threads: Vec::new(),
            supervisor: None,
            local_addr,
            grace: self.shutdown_grace,
            done: false,
        };
        // Idle buffers pooled by the workers stay within a quarter of the budget.
        let pool = budget / 4 / self.threads.max(1);
        for (index, rx) in receivers.into_iter().enumerate() {
            let shared = shared.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let t = std::thread::Builder::new()
                .name(format!("nbd-worker-{index}"))
                .spawn(move || worker(shared, index, pool, rx, ready_tx))
                .map_err(|e| NbdError::Worker { index, source: e })?;
            handle.threads.push(t);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(NbdError::Worker { index, source: e }),
                Err(_) => return Err(NbdError::WorkerPanicked(index)),
            }
        }
        let sup = shared.clone();
        let t = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || supervisor(sup))
            .map_err(|e| NbdError::Worker {
                index: usize::MAX,
                source: e,
            })?;
        handle.supervisor = Some(t);
        Ok(handle)
    }
}

/// Work handed to a worker thread (runs there, so it may spawn local tasks).
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// Messages to a worker thread.
pub(crate) enum Msg {
    /// A new connection to serve.
    Conn(Accepted),
    /// A request offloaded by a connection living on another worker.
    Job(Job),
    /// Shutdown progressed: exit once idle.
    Wake,
}

/// A worker's inbox, its number of connections and whether it is alive and ticking.
pub(crate) struct Slot {
    pub(crate) tx: mpsc::UnboundedSender<Msg>,
    pub(crate) load: AtomicUsize,
    /// False once the thread has exited (or died).
    pub(crate) alive: AtomicBool,
    /// Last heartbeat ([`Clock`] milliseconds): a worker stuck in a blocking device call
    /// stops beating and gets no new connections.
    pub(crate) beat: AtomicU64,
}

/// A connection on its way to a worker.
pub(crate) struct Accepted {
    pub(crate) fd: Arc<OwnedFd>,
    pub(crate) entry: Arc<ConnEntry>,
}

/// State shared by the handle, the supervisor and all workers.
pub(crate) struct Shared {
    /// TLS offered or required, with its credentials.
    pub(crate) tls: Option<Tls>,
    pub(crate) exports: Vec<ExportEntry>,
    pub(crate) limits: Limits,
    pub(crate) max_requests_per_connection: usize,
    pub(crate) max_bytes_per_connection: usize,
    /// Payload buffers in flight across the server.
    pub(crate) budget: Arc<Budget>,
    pub(crate) clock: Clock,
    pub(crate) listeners: Vec<Listener>,
    pub(crate) workers: Vec<Slot>,
    next_worker: AtomicUsize,
    stopping: AtomicBool,
    /// An eventfd the supervisor polls: written once at stop.
    pub(crate) stop_fd: OwnedFd,
    /// Live connections, so the supervisor and shutdown can reach them.
    conns: Mutex<HashMap<u64, Arc<ConnEntry>>>,
    next_id: AtomicU64,
    total: AtomicU64,
    stop_lock: Mutex<bool>,
    stop_cv: Condvar,
}

impl Shared {
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Export by name; the empty name means the first (default) export.
    pub(crate) fn find_export(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    /// Number of worker threads.
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.len()
    }

    /// Picks a worker for offloaded work, round robin.
    pub(crate) fn next_worker(&self) -> usize {
        self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len()
    }

    /// Runs `job` on worker `index`; gives it back if that worker is gone.
    pub(crate) fn send_job(&self, index: usize, job: Job) -> Result<(), Job> {
        match self.workers[index].tx.unbounded_send(Msg::Job(job)) {
            Ok(()) => Ok(()),
            Err(e) => match e.into_inner() {
                Msg::Job(j) => Err(j),
                _ => Ok(()),
            },
        }
    }

    pub(crate) fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnEntry>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A snapshot of the live connections.
    pub(crate) fn entries(&self) -> Vec<Arc<ConnEntry>> {
        self.conns().values().cloned().collect()
    }

    /// Registers a just accepted connection.
    pub(crate) fn register(&self, fd: &Arc<OwnedFd>, peer: String) -> Arc<ConnEntry> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ConnEntry::new(id, fd, peer, self.clock));
        self.conns().insert(id, entry.clone());
        self.total.fetch_add(1, Ordering::Relaxed);
        entry
    }

    pub(crate) fn unregister(&self, id: u64) {
        self.conns().remove(&id);
    }

    /// `shutdown(SHUT_RD)` on every live connection.
    fn sweep_read_side(&self) {
        for e in self.entries() {
            e.shutdown(libc::SHUT_RD);
        }
    }

    /// Stops accepting (idempotent) and wakes whoever waits in [`ServerHandle::wait`].
    fn request_stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe {
            libc::write(
                self.stop_fd.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            );
        }
        // New clients are refused from now on rather than left in the backlog.
        for l in &self.listeners {
            shutdown(l.fd(), libc::SHUT_RDWR);
        }
        *self.stop_lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.stop_cv.notify_all();
    }
}

/// Asks a running server to stop, from any thread (a signal-handling thread, say; `stop`
/// takes a lock, so not from inside an async signal handler itself).
#[derive(Clone)]
pub struct Stopper {
    shared: Arc<Shared>,
}

impl Stopper {
    /// Stops accepting connections; [`ServerHandle::wait`] then finishes the shutdown.
    pub fn stop(&self) {
        self.shared.request_stop();
    }
}

/// A running server. Dropping it shuts it down (errors are then only logged).
pub struct ServerHandle {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    supervisor: Option<JoinHandle<()>>,
    local_addr: Option<SocketAddr>,
    grace: Duration,
    done: bool,
}

/// After the grace period and cutting every socket, how long shutdown still waits for
/// connections and workers to wind down before it gives up on them.
const FORCED_STOP_WAIT: Duration = Duration::from_secs(2);

/// Polls `done` every few milliseconds until it holds or `deadline` passes.
fn wait_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl ServerHandle {
    /// The bound TCP address (useful with port 0), if serving TCP.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Connections currently open (handshake or transmission).
    pub fn connections(&self) -> usize {
        self.shared.conns().len()
    }

    /// Connections accepted since start.
    pub fn total_connections(&self) -> u64 {
        self.shared.total.load(Ordering::Relaxed)
    }

    /// The limits this server runs with.
    pub fn limits(&self) -> &Limits {
        &self.shared.limits
    }

    /// A handle that can trigger the shutdown from another thread.
    pub fn stopper(&self) -> Stopper {
        Stopper {
            shared: self.shared.clone(),
        }
    }

    /// Blocks until a [`Stopper`] asks for a stop, then shuts down like [`Self::shutdown`].
    pub fn wait(mut self) -> Result<(), NbdError> {
        {
            let mut stop = self
                .shared
                .stop_lock
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            while !*stop {
                stop = self
                    .shared
                    .stop_cv
                    .wait(stop)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
        self.finish()
    }

    /// Stops accepting, lets connections answer what they have read, closes them (waiting
    /// at most the shutdown grace before cutting them off), stops the workers, then
    /// flushes every export. Returns within the grace period plus a few seconds even when
    /// clients are stuck; connections whose device requests never complete are then left
    /// behind and reported as [`NbdError::ShutdownTimedOut`].
    pub fn shutdown(mut self) -> Result<(), NbdError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), NbdError> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let sh = &self.shared;
        sh.request_stop();
        if let Some(t) = self.supervisor.take() {
            // It polls the stop eventfd, so it ends at once.
            let _ = t.join();
        }
        // Reading side first: clients get replies to everything already sent.
        sh.sweep_read_side();
        let empty = || sh.conns().is_empty();
        if !wait_until(Instant::now() + self.grace, empty) {
            // A client that does not read its replies: cut it off. Requests still on a
            // device are waited for a little longer, then left behind.
            for e in sh.entries() {
                e.kill("the server is shutting down");
            }
            wait_until(Instant::now() + FORCED_STOP_WAIT, empty);
        }
        // Every connection is gone (or given up on): let the workers exit.
        for w in &sh.workers {
            let _ = w.tx.unbounded_send(Msg::Wake);
        }
        let deadline = Instant::now() + FORCED_STOP_WAIT;
        wait_until(deadline, || self.threads.iter().all(|t| t.is_finished()));
        let mut result = Ok(());
        let mut stuck = 0;
        for (i, t) in self.threads.drain(..).enumerate() {
            if !t.is_finished() {
                // Left running: it exits by itself once its device requests complete.
                stuck += 1;
                continue;
            }
            if t.join().is_err() && result.is_ok() {
                result = Err(NbdError::WorkerPanicked(i));
            }
        }
        let left = sh.conns().len();
        if (stuck > 0 || left > 0) && result.is_ok() {
            log::error!("nbd: shutdown: {left} connection(s), {stuck} worker(s) left behind");
            result = Err(NbdError::ShutdownTimedOut {
                connections: left,
                workers: stuck,
            });
        }
        for l in &sh.listeners {
            if let Listener::Unix(_, path) = l {
                let _ = std::fs::remove_file(path);
            }
        }
        result.and(flush_exports(sh))
    }
}

/// Flushes every export on a temporary runtime; a panicking target is an error, not a
/// crash of the caller.
fn flush_exports(sh: &Shared) -> Result<(), NbdError> {
    let rt = iort::Runtime::new(8).map_err(|e| NbdError::Worker {
        index: usize::MAX,
        source: e,
    })?;
    rt.block_on(async {
        for e in &sh.exports {
            let r = AssertUnwindSafe(e.dev.flush()).catch_unwind().await;
            let r = r.unwrap_or_else(|_| Err(IoError::eio("the target panicked in flush")));
            r.map_err(|source| NbdError::Flush {
                export: e.name.clone(),
                source,
            })?;
        }
        Ok(())
    })
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            log::error!("nbd: shutdown: {e}");
        }
    }
}

/// Per-worker bookkeeping of its connections.
#[derive(Default)]
struct Local {
    live: Cell<usize>,
    /// Woken when `live` drops to zero.
    idle: RefCell<Option<Waker>>,
}

/// How often a worker beats.
const BEAT: Duration = Duration::from_millis(100);

/// Marks the worker dead however its thread ends; if it dies (a panic escaped a task), its
/// connections can never be served: close them so their clients see it.
struct WorkerGuard {
    shared: Arc<Shared>,
    index: usize,
}

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        self.shared.workers[self.index]
            .alive
            .store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            log::error!("nbd: worker thread {} died", self.index);
            for e in self.shared.entries() {
                if e.worker() == Some(self.index) {
                    e.kill("its worker thread died");
                    self.shared.unregister(e.id);
                }
            }
        }
    }
}

fn worker(
    shared: Arc<Shared>,
    index: usize,
    pool: usize,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let _guard = WorkerGuard {
        shared: shared.clone(),
        index,
    };
    let rt = match iort::Runtime::new(1024) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    set_pool_limit(pool);
    let _ = ready.send(Ok(()));
    let local = Rc::new(Local::default());
    let intake_done = Rc::new(Cell::new(false));
    rt.block_on(async {
        let intake = async {
            while let Some(msg) = rx.next().await {
                match msg {
                    Msg::Conn(acc) => {
                        local.live.set(local.live.get() + 1);
                        let guard = ConnGuard {
                            shared: shared.clone(),
                            local: local.clone(),
                            index,
                            id: acc.entry.id,
                        };
                        let f = connection(shared.clone(), index, acc, guard);
                        if iort::spawn(f).is_err() {
                            log::error!("nbd: cannot spawn a connection task");
                        }
                    }
                    Msg::Job(job) => job(),
                    Msg::Wake => {
                        if shared.is_stopping() {
                            break;
                        }
                    }
                }
            }
            // Shutdown: wait for our connections to end (normally they already have).
            poll_fn(|cx| {
                if local.live.get() == 0 {
                    Poll::Ready(())
                } else {
                    *local.idle.borrow_mut() = Some(cx.waker().clone());
                    Poll::Pending
                }
            })
            .await;
            intake_done.set(true);
        };
        let heartbeat = async {
            let slot = &shared.workers[index];
            while !intake_done.get() {
                slot.beat.store(shared.clock.now(), Ordering::Relaxed);
                iort::sleep(BEAT).await;
            }
        };
        futures::join!(intake, heartbeat);
    });
}

struct ConnGuard {
    shared: Arc<Shared>,
    local: Rc<Local>,
    index: usize,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.shared.unregister(self.id);
        self.shared.workers[self.index]
            .load
            .fetch_sub(1, Ordering::Relaxed);
        let live = self.local.live.get() - 1;
        self.local.live.set(live);
        if live == 0 {
            if let Some(w) = self.local.idle.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

async fn connection(shared: Arc<Shared>, index: usize, acc: Accepted, guard: ConnGuard) {
    let _guard = guard;
    let Accepted { fd, entry } = acc;
    if shared.is_stopping() {
        return;
    }
    let raw = fd.as_raw_fd();
    let mut rb = RecvBuf::new(raw, entry.watch.clone());
    // The handshake asks the device for its size and limits: a panic there ends this
    // connection only.
    let outcome = AssertUnwindSafe(async {
        // SAFETY: `rb` lives in this task's frame and is awaited here: the task is completed
        // or dropped (which drops this first, waiting for the kernel), and a leaked task
        // leaks `rb` with it.
        unsafe { handshake(&shared, raw, &mut rb) }.await
    })
    .catch_unwind()
    .await;
    let outcome = match outcome {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            log::debug!("nbd: {}: handshake ended: {e}", entry.peer);
            return;
        }
        Err(_) => {
            log::error!("nbd: {}: panic during the handshake; closing", entry.peer);
            return;
        }
    };
    match outcome {
        Outcome::Transmit(idx, structured) => {
            serve_export(&shared, index, &entry, raw, rb, idx, structured).await
        }
        Outcome::Done => {}
        Outcome::StartTls(g) => {
            // The rest runs over a socket pair whose other end a TLS pump serves.
            let session = match shared.tls.as_ref().map(|t| t.session()) {
                Some(Ok(s)) => s,
                Some(Err(e)) => {
                    log::warn!("nbd: {}: {e}", entry.peer);
                    return;
                }
                None => return,
            };
            let (ours, theirs) = match crate::tls::socket_pair() {
                Ok(p) => p,
                Err(e) => {
                    log::warn!(
                        "nbd: {}: cannot make a socket pair for TLS: {e}",
                        entry.peer
                    );
                    return;
                }
            };
            let pump = crate::tls::pump(fd.clone(), theirs, session);
            let rest = async {
                let plain = ours.as_raw_fd();
                let mut rb = RecvBuf::new(plain, entry.watch.clone());
                let o = AssertUnwindSafe(async {
                    // SAFETY: as for the handshake above.
                    unsafe { options(&shared, plain, &mut rb, g, true) }.await
                })
                .catch_unwind()
                .await;
                match o {
                    Ok(Ok(Outcome::Transmit(idx, structured))) => {
                        serve_export(&shared, index, &entry, plain, rb, idx, structured).await
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => log::debug!("nbd: {}: TLS handshake ended: {e}", entry.peer),
                    Err(_) => {
                        log::error!("nbd: {}: panic during the handshake; closing", entry.peer)
                    }
                }
                // The pump sees the pair close and ends the TLS session.
                drop(ours);
            };
            futures::future::join(pump, rest).await;
        }
    }
    // `fd` (and the socket) closes here, after every reply went out.
    drop(fd);
}

/// The transmission phase on `raw` (the socket, or the plaintext end of a TLS pump).
async fn serve_export(
    shared: &Arc<Shared>,
    index: usize,
    entry: &Arc<ConnEntry>,
    raw: RawFd,
    rb: RecvBuf,
    idx: usize,
    structured: bool,
) {
    let view = shared.exports[idx].view();
    entry.transmitting();
    let ex = &shared.exports[idx];
    let r = transmit(
        raw,
        view,
        shared.clone(),
        entry.clone(),
        index,
        structured,
        rb,
    )
    .await;
    if let Err(e) = r {
        log::info!(
            "nbd: export '{}': {}: connection closed: {e}",
            ex.name,
            entry.peer
        );
    }
}
