//! Server configuration, worker threads, accepting, shutdown.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::task::{Poll, Waker};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::channel::mpsc;
use futures::StreamExt;
use tables::{DeviceRef, IoError};

use crate::conn::{transmit, ExportView, MAX_PAYLOAD};
use crate::handshake::{handshake, Outcome};
use crate::proto::*;
use crate::sock::{set_nodelay, shutdown, RecvBuf};

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
    handshake_timeout: Duration,
    shutdown_grace: Duration,
    max_connections: usize,
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

    /// How long a client may take to finish the handshake (default 30 s).
    pub fn handshake_timeout(mut self, d: Duration) -> ServerBuilder {
        self.handshake_timeout = d;
        self
    }

    /// At shutdown, how long connections get to finish their in-flight requests before
    /// their sockets are shut down outright (default 5 s).
    pub fn shutdown_grace(mut self, d: Duration) -> ServerBuilder {
        self.shutdown_grace = d;
        self
    }

    /// Connections open at once; further clients are closed right after `accept` (default
    /// 1024). Each connection may hold up to 64 MiB of request buffers.
    pub fn max_connections(mut self, n: usize) -> ServerBuilder {
        self.max_connections = n.max(1);
        self
    }

    /// Checks the configuration.
    pub fn build(self) -> Result<Server, NbdError> {
        if self.exports.is_empty() {
            return Err(NbdError::NoExports);
        }
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
            handshake_timeout: self.handshake_timeout,
            shutdown_grace: self.shutdown_grace,
            max_connections: self.max_connections,
        })
    }
}

/// A configured NBD server, not yet listening. See the crate documentation.
pub struct Server {
    exports: Vec<ExportEntry>,
    threads: usize,
    handshake_timeout: Duration,
    shutdown_grace: Duration,
    max_connections: usize,
}

/// A bound listening socket to serve on.
pub enum Listener {
    /// TCP (every accepted socket gets `TCP_NODELAY`).
    Tcp(TcpListener),
    /// A Unix stream socket; the path is removed at shutdown.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
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
            handshake_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
            max_connections: 1024,
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
        let local_addr = listeners.iter().find_map(|l| match l {
            Listener::Tcp(t) => t.local_addr().ok(),
            _ => None,
        });
        let mut workers = Vec::new();
        let mut receivers = Vec::new();
        for _ in 0..self.threads {
            let (tx, rx) = mpsc::unbounded();
            workers.push(Slot {
                tx,
                load: AtomicUsize::new(0),
            });
            receivers.push(rx);
        }
        let shared = Arc::new(Shared {
            exports: self.exports,
            handshake_timeout: self.handshake_timeout,
            max_connections: self.max_connections,
            listeners,
            workers,
            next_worker: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            total: AtomicU64::new(0),
            stop_lock: Mutex::new(false),
            stop_cv: Condvar::new(),
        });
        let mut handle = ServerHandle {
            shared: shared.clone(),
            threads: Vec::new(),
            local_addr,
            grace: self.shutdown_grace,
            done: false,
        };
        for (index, rx) in receivers.into_iter().enumerate() {
            let shared = shared.clone();
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let t = std::thread::Builder::new()
                .name(format!("nbd-worker-{index}"))
                .spawn(move || worker(shared, index, rx, ready_tx))
                .map_err(|e| NbdError::Worker { index, source: e })?;
            handle.threads.push(t);
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(NbdError::Worker { index, source: e }),
                Err(_) => return Err(NbdError::WorkerPanicked(index)),
            }
        }
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

/// A worker's inbox and its number of connections.
struct Slot {
    tx: mpsc::UnboundedSender<Msg>,
    load: AtomicUsize,
}

pub(crate) struct Accepted {
    fd: Arc<OwnedFd>,
    id: u64,
}

/// State shared by the handle and all workers.
pub(crate) struct Shared {
    pub(crate) exports: Vec<ExportEntry>,
    handshake_timeout: Duration,
    max_connections: usize,
    listeners: Vec<Listener>,
    workers: Vec<Slot>,
    next_worker: AtomicUsize,
    stopping: AtomicBool,
    /// Live connections, so shutdown can reach their sockets.
    conns: Mutex<HashMap<u64, Weak<OwnedFd>>>,
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

    fn conns(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<OwnedFd>>> {
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, fd: &Arc<OwnedFd>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.conns().insert(id, Arc::downgrade(fd));
        self.total.fetch_add(1, Ordering::Relaxed);
        id
    }

    fn unregister(&self, id: u64) {
        self.conns().remove(&id);
    }

    /// `shutdown(how)` on every live connection.
    fn sweep(&self, how: libc::c_int) {
        let fds: Vec<Arc<OwnedFd>> = self.conns().values().filter_map(|w| w.upgrade()).collect();
        for fd in fds {
            shutdown(fd.as_raw_fd(), how);
        }
    }

    /// Stops accepting (idempotent) and wakes whoever waits in [`ServerHandle::wait`].
    fn request_stop(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        // A listening socket that is shut down fails its pending accept with EINVAL, which
        // ends the accept loops (TCP and Unix alike).
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
    local_addr: Option<SocketAddr>,
    grace: Duration,
    done: bool,
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
    /// flushes every export.
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
        // Reading side first: clients get replies to everything already sent.
        sh.sweep(libc::SHUT_RD);
        let deadline = Instant::now() + self.grace;
        while !sh.conns().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if !sh.conns().is_empty() {
            // A client that does not read its replies: cut it off.
            sh.sweep(libc::SHUT_RDWR);
            // Requests still on a device are waited for (a device that never completes
            // keeps the server from stopping).
            while !sh.conns().is_empty() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Every connection is gone, so no offloaded work remains: let the workers exit.
        for w in &sh.workers {
            let _ = w.tx.unbounded_send(Msg::Wake);
        }
        let mut result = Ok(());
        for (i, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() && result.is_ok() {
                result = Err(NbdError::WorkerPanicked(i));
            }
        }
        for l in &sh.listeners {
            if let Listener::Unix(_, path) = l {
                let _ = std::fs::remove_file(path);
            }
        }
        let flushed = iort::Runtime::new(8)
            .map_err(|e| NbdError::Worker {
                index: usize::MAX,
                source: e,
            })
            .and_then(|rt| {
                rt.block_on(async {
                    for e in &sh.exports {
                        e.dev.flush().await.map_err(|source| NbdError::Flush {
                            export: e.name.clone(),
                            source,
                        })?;
                    }
                    Ok(())
                })
            });
        result.and(flushed)
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Err(e) = self.finish() {
            log::error!("nbd: shutdown: {e}");
        }
    }
}

/// (deadline, finished flag, socket) of a connection still in its handshake.
type PendingHandshake = (Instant, Rc<Cell<bool>>, Weak<OwnedFd>);

/// Per-worker bookkeeping of its connections.
#[derive(Default)]
struct Local {
    live: Cell<usize>,
    /// Woken when `live` drops to zero.
    idle: RefCell<Option<Waker>>,
    /// Connections still in the handshake: (deadline, finished flag, socket).
    handshakes: RefCell<Vec<PendingHandshake>>,
}

fn worker(
    shared: Arc<Shared>,
    index: usize,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    ready: std::sync::mpsc::Sender<io::Result<()>>,
) {
    let rt = match iort::Runtime::new(1024) {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let local = Rc::new(Local::default());
    let intake_done = Rc::new(Cell::new(false));
    rt.block_on(async {
        // Worker 0 also accepts; the accept loops end when shutdown shuts the listeners.
        let accept_loops = futures::future::join_all(
            shared
                .listeners
                .iter()
                .filter(|_| index == 0)
                .map(|l| acceptor(shared.clone(), l.fd(), matches!(l, Listener::Tcp(_)))),
        );
        let intake = async {
            while let Some(msg) = rx.next().await {
                match msg {
                    Msg::Conn(acc) => {
                        local.live.set(local.live.get() + 1);
                        let guard = ConnGuard {
                            shared: shared.clone(),
                            local: local.clone(),
                            index,
                            id: acc.id,
                        };
                        let f = connection(shared.clone(), index, local.clone(), acc.fd, guard);
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
        futures::join!(accept_loops, intake, ticker(&shared, &local, &intake_done));
    });
}

/// Enforces handshake deadlines; ends with the worker.
async fn ticker(shared: &Shared, local: &Local, done: &Cell<bool>) {
    let tick = Duration::from_millis(100)
        .min(shared.handshake_timeout / 2)
        .max(Duration::from_millis(1));
    while !done.get() {
        iort::sleep(tick).await;
        let now = Instant::now();
        local
            .handshakes
            .borrow_mut()
            .retain(|(deadline, finished, fd)| {
                if finished.get() {
                    return false;
                }
                if now >= *deadline {
                    if let Some(fd) = fd.upgrade() {
                        log::info!("nbd: handshake timed out, closing the connection");
                        shutdown(fd.as_raw_fd(), libc::SHUT_RDWR);
                    }
                    return false;
                }
                true
            });
    }
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

/// Marks the handshake finished however the connection task ends.
struct Finished(Rc<Cell<bool>>);
impl Drop for Finished {
    fn drop(&mut self) {
        self.0.set(true);
    }
}

async fn connection(
    shared: Arc<Shared>,
    index: usize,
    local: Rc<Local>,
    fd: Arc<OwnedFd>,
    guard: ConnGuard,
) {
    let _guard = guard;
    if shared.is_stopping() {
        return;
    }
    let raw = fd.as_raw_fd();
    let mut rb = RecvBuf::new(raw);
    let finished = Finished(Rc::new(Cell::new(false)));
    local.handshakes.borrow_mut().push((
        Instant::now() + shared.handshake_timeout,
        finished.0.clone(),
        Arc::downgrade(&fd),
    ));
    let outcome = handshake(&shared, raw, &mut rb).await;
    drop(finished);
    let (idx, structured) = match outcome {
        Ok(Outcome::Transmit(idx, structured)) => (idx, structured),
        Ok(Outcome::Done) => return,
        Err(e) => {
            log::debug!("nbd: handshake ended: {e}");
            return;
        }
    };
    let ex = &shared.exports[idx];
    if let Err(e) = transmit(raw, ex.view(), shared.clone(), index, structured, rb).await {
        log::info!("nbd: export '{}': connection closed: {e}", ex.name);
    }
    // `fd` (and the socket) closes here, after every reply went out.
    drop(fd);
}

async fn acceptor(shared: Arc<Shared>, lfd: RawFd, is_tcp: bool) {
    loop {
        match iort::accept(lfd).await {
            Ok(fd) => {
                if shared.is_stopping() {
                    break;
                }
                if shared.conns().len() >= shared.max_connections {
                    log::warn!(
                        "nbd: {} connections open (the limit): refusing a new one",
                        shared.max_connections
                    );
                    continue;
                }
                if is_tcp {
                    set_nodelay(fd.as_raw_fd());
                }
                let fd = Arc::new(fd);
                let id = shared.register(&fd);
                // The least loaded worker takes the connection.
                let Some(slot) = shared
                    .workers
                    .iter()
                    .min_by_key(|s| s.load.load(Ordering::Relaxed))
                else {
                    shared.unregister(id);
                    break;
                };
                slot.load.fetch_add(1, Ordering::Relaxed);
                if slot
                    .tx
                    .unbounded_send(Msg::Conn(Accepted { fd, id }))
                    .is_err()
                {
                    slot.load.fetch_sub(1, Ordering::Relaxed);
                    shared.unregister(id);
                }
            }
            Err(e) => {
                if shared.is_stopping() {
                    break;
                }
                match e.raw_os_error() {
                    Some(libc::ECONNABORTED) | Some(libc::EINTR) | Some(libc::EAGAIN) => {}
                    Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS)
                    | Some(libc::ENOMEM) => {
                        log::warn!("nbd: accept: {e}; retrying shortly");
                        iort::sleep(Duration::from_millis(100)).await;
                    }
                    _ => {
                        log::error!("nbd: accept: {e}");
                        iort::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }
}
