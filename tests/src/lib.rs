//! Helpers for end-to-end tests: run the real `volmgr` binary and real peers (qemu-io, nbdinfo,
//! nbdcopy, fio, qemu-storage-daemon, mkfs, e2fsck) against it.
//!
//! A peer that is missing makes the test fail with a message naming it: these tests never pass
//! silently on a machine that cannot run them (`scripts/setup.sh` installs everything).

#![warn(clippy::undocumented_unsafe_blocks)]

use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub mod ceph;
pub mod model;
pub mod mpath;
pub mod netns;

/// Path of the built `volmgr` binary (same profile as this test).
pub fn volmgr_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/e2e-HASH -> target/<profile>/volmgr
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir layout");
    let bin = dir.join("volmgr");
    assert!(
        bin.exists(),
        "volmgr binary not found at {} — build it first (cargo build -p volmgr)",
        bin.display()
    );
    bin
}

/// [`require_tool`] for each of `tools`.
pub fn require_tools(tools: &[&str]) {
    tools.iter().for_each(|t| require_tool(t));
}

/// Fails the test (with the tool's name) if a required external tool is not installed.
pub fn require_tool(tool: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "required tool '{tool}' is not installed: run scripts/setup.sh (this test cannot pass without it)"
    );
}

/// Fails the test loudly unless running as root (mount, losetup need it).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "this test needs root (mount/losetup); it cannot run as uid {uid}"
    );
}

/// Runs `qemu-io -f raw -c CMD... URI` (for at most 120 s) and asserts that every command
/// worked; returns its output.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    // Bounded: a server that never answers fails the test instead of hanging it.
    let mut c = Command::new("timeout");
    c.args(["120", "qemu-io", "-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let o = run(c.arg(uri)).expect("running qemu-io");
    let s = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !s.contains("failed") && !s.contains("error"),
        "qemu-io {cmds:?} {uri}: {s}"
    );
    s
}

/// A free TCP port on 127.0.0.1 (racy by nature; tests retry on bind failure).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Runs a command, returns its output; error if it could not start.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    Ok(out)
}

/// `volmgr ARGS` for an LVM test living in `root`: state directory `root/state`, devices
/// file `root/lvm-devices`.
pub fn volmgr_in(root: &Path, args: &[&str]) -> Output {
    run(Command::new(volmgr_bin())
        .args(args)
        .env("VOLMGR_STATE_DIR", root.join("state"))
        .env("VOLMGR_LVM_DEVICESFILE", root.join("lvm-devices")))
    .expect("running volmgr")
}

/// [`volmgr_in`], asserting success; returns stdout.
pub fn volmgr_ok_in(root: &Path, args: &[&str]) -> String {
    let o = volmgr_in(root, args);
    assert!(
        o.status.success(),
        "volmgr {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `fio` over NBD export `uri` (its nbd engine): random writes of 4k-64k at depth 8 with
/// `verify=crc32c` (every block read back and checked, the first bad one fatal), JSON
/// output; `extra` adds the size, offset, loops. Killed after `secs` seconds (a hung server
/// fails the test instead of hanging it).
pub fn fio_verify(uri: &str, secs: u32, extra: &[&str]) -> Command {
    let mut c = Command::new("timeout");
    c.arg(secs.to_string())
        .args(["fio", "--name=verify", "--ioengine=nbd"])
        .arg(format!("--uri={uri}"))
        .args([
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--output-format=json",
        ])
        .args(extra);
    c
}

/// Runs a command and fails unless it exits 0; returns stdout.
pub fn run_ok(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A `volmgr serve` process exporting a table over NBD on 127.0.0.1; killed on drop.
pub struct Served {
    /// The server process.
    pub child: Option<Child>,
    /// TCP port.
    pub port: u16,
    /// Export name.
    pub export: String,
    stderr_log: PathBuf,
}

impl Served {
    /// Starts `volmgr serve TABLE --nbd 127.0.0.1:PORT --export NAME` and waits until it accepts.
    pub fn start(table: &Path, export: &str, extra: &[&str], log_dir: &Path) -> Result<Served> {
        for _attempt in 0..5 {
            let port = free_port();
            let log = log_dir.join(format!("serve-{port}.log"));
            let errf = std::fs::File::create(&log)?;
            let child = Command::new(volmgr_bin())
                .arg("serve")
                .arg(table)
                .arg("--nbd")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--export")
                .arg(export)
                .args(extra)
                .stdout(Stdio::null())
                .stderr(errf)
                .spawn()
                .context("spawning volmgr serve")?;
            let mut s = Served {
                child: Some(child),
                port,
                export: export.to_string(),
                stderr_log: log,
            };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(20) {
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(s);
                }
                if let Some(c) = s.child.as_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        let log = std::fs::read_to_string(&s.stderr_log).unwrap_or_default();
                        if log.contains("Address already in use") {
                            break;
                        }
                        bail!("volmgr serve exited early ({st}): {log}");
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        bail!("volmgr serve did not start listening")
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, self.export)
    }

    /// The server's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits; returns the exit status code.
    pub fn terminate(mut self) -> Result<i32> {
        let mut c = self.child.take().context("already stopped")?;
        let pid = c.id() as i32;
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait()? {
                return Ok(st.code().unwrap_or(-1));
            }
            if t0.elapsed() > Duration::from_secs(30) {
                let _ = c.kill();
                bail!("volmgr serve did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the server process is still running.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Creates a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    Ok(())
}

/// Deterministic pseudo-random bytes (xorshift), for images we can regenerate.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// Reads a whole file.
pub fn read_all(path: &Path) -> Result<Vec<u8>> {
    let mut v = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut v)?;
    Ok(v)
}

/// A host-side block device for an NBD export, made of a qemu-storage-daemon FUSE export of the
/// NBD URI over a regular file and a loop device on that file (our hosts have no nbd client
/// module). Torn down on drop.
pub struct FuseLoop {
    qsd: Option<Child>,
    /// The FUSE mountpoint file.
    pub fuse_file: PathBuf,
    /// The loop device (`/dev/loopN`).
    pub loopdev: String,
}

impl FuseLoop {
    /// Attaches `nbd://127.0.0.1:port/export` as a loop device.
    pub fn attach(port: u16, export: &str, dir: &Path) -> Result<FuseLoop> {
        let fuse_file = dir.join("fuse-export.img");
        std::fs::File::create(&fuse_file)?;
        let log = std::fs::File::create(dir.join("qsd.log"))?;
        let qsd = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=nbd,node-name=n0,discard=unmap,server.type=inet,server.host=127.0.0.1,server.port={port},export={export}"
            ))
            .arg("--export")
            .arg(format!(
                "type=fuse,id=e0,node-name=n0,mountpoint={},writable=on",
                fuse_file.display()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting qemu-storage-daemon")?;
        let mut fl = FuseLoop {
            qsd: Some(qsd),
            fuse_file: fuse_file.clone(),
            loopdev: String::new(),
        };
        // The FUSE mount replaces the file's size once the export is up.
        let t0 = Instant::now();
        loop {
            let len = std::fs::metadata(&fuse_file).map(|m| m.len()).unwrap_or(0);
            if len > 0 {
                break;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!(
                    "qemu-storage-daemon FUSE export did not come up: {}",
                    std::fs::read_to_string(dir.join("qsd.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = run_ok(
            Command::new("losetup")
                .arg("-f")
                .arg("--show")
                .arg("--direct-io=off")
                .arg(&fuse_file),
        )?;
        fl.loopdev = out.trim().to_string();
        Ok(fl)
    }
}

impl FuseLoop {
    /// Unmounts the file system on the loop device from `mnt`, checks it with `e2fsck -fn`
    /// (fails the test naming what e2fsck said unless it is clean), and mounts it again.
    pub fn fsck_and_remount(&self, mnt: &Path) {
        run_ok(Command::new("umount").arg(mnt)).expect("umount");
        let fsck = run(Command::new("e2fsck").args(["-fn", &self.loopdev])).expect("e2fsck");
        assert!(
            fsck.status.success(),
            "e2fsck {}: {}",
            self.loopdev,
            String::from_utf8_lossy(&fsck.stdout)
        );
        run_ok(Command::new("mount").arg(&self.loopdev).arg(mnt)).expect("mount");
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if !self.loopdev.is_empty() {
            // A test that failed half way may have left its file system mounted here.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(&self.loopdev)
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("losetup")
                .arg("-d")
                .arg(&self.loopdev)
                .status();
        }
        if let Some(mut c) = self.qsd.take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Lines of a process's output containing `pat`.
pub fn grep_lines(text: &str, pat: &str) -> Vec<String> {
    BufReader::new(text.as_bytes())
        .lines()
        .map_while(|l| l.ok())
        .filter(|l| l.contains(pat))
        .collect()
}

/// sha256 of every file under `root/sub` (sorted, `lost+found` skipped), one line per file.
pub fn tree_sums(root: &Path, sub: &str) -> String {
    run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("cd \"$1\" && find \"$2\" -type f ! -path '*/lost+found/*' | sort | xargs -r sha256sum")
            .arg("sh")
            .arg(root)
            .arg(sub),
    )
    .expect("sha256 of a file tree")
}

/// A `volmgr daemon --no-ublk` on a state directory; killed on drop unless stopped.
pub struct DaemonProc {
    child: Option<Child>,
    /// The state directory (`VOLMGR_STATE_DIR` for the CLI calls).
    pub state: PathBuf,
    log: PathBuf,
}

impl DaemonProc {
    /// Starts the daemon (with `extra` arguments) without waiting for anything.
    pub fn spawn(state: &Path, extra: &[&str]) -> DaemonProc {
        Self::spawn_in(state, extra, None)
    }

    /// [`DaemonProc::spawn`], inside network namespace `ns` when given (`ip netns exec`
    /// execs the daemon, so the child is the daemon itself; its control socket is a file,
    /// which the CLI reaches from any namespace).
    fn spawn_in(state: &Path, extra: &[&str], ns: Option<&str>) -> DaemonProc {
        let log = state.with_extension("log");
        let errf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("daemon log");
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(volmgr_bin());
                c
            }
            None => Command::new(volmgr_bin()),
        };
        let child = cmd
            .args(["daemon", "--no-ublk"])
            .args(extra)
            .env("VOLMGR_STATE_DIR", state)
            .stdout(Stdio::null())
            .stderr(errf)
            .spawn()
            .expect("spawning volmgr daemon");
        DaemonProc {
            child: Some(child),
            state: state.to_path_buf(),
            log,
        }
    }

    /// Starts the daemon inside network namespace `ns` and waits for its control socket.
    pub fn start_in_netns(state: &Path, ns: &str) -> DaemonProc {
        let _ = std::fs::remove_file(state.join("control.sock"));
        Self::spawn_in(state, &[], Some(ns)).wait_socket()
    }

    /// Starts the daemon and waits for its control socket.
    pub fn start(state: &Path) -> DaemonProc {
        Self::start_with(state, &[])
    }

    /// [`DaemonProc::start`] with extra daemon arguments.
    pub fn start_with(state: &Path, extra: &[&str]) -> DaemonProc {
        let _ = std::fs::remove_file(state.join("control.sock"));
        Self::spawn(state, extra).wait_socket()
    }

    /// Waits until the control socket exists.
    fn wait_socket(self) -> DaemonProc {
        let d = self;
        let t0 = Instant::now();
        while !d.state.join("control.sock").exists() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "daemon did not start: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The socket file appears at bind(); give listen() a moment.
        std::thread::sleep(Duration::from_millis(50));
        d
    }

    /// The daemon's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `volmgr ARGS` against this daemon.
    pub fn vm(&self, args: &[&str]) -> Output {
        run(Command::new(volmgr_bin())
            .args(args)
            .env("VOLMGR_STATE_DIR", &self.state))
        .expect("running volmgr")
    }

    /// Runs `volmgr ARGS`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.vm(args);
        assert!(
            o.status.success(),
            "volmgr {args:?} failed: {}{}\ndaemon log: {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
            self.log()
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs `volmgr ARGS`, asserts failure, returns stderr.
    pub fn err(&self, args: &[&str]) -> String {
        let o = self.vm(args);
        assert!(!o.status.success(), "volmgr {args:?} should fail");
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// Creates a device exported over NBD on a free port; returns the port.
    pub fn create_nbd(&self, name: &str, table_file: &Path) -> u16 {
        let port = free_port();
        self.ok(&[
            "dev",
            "create",
            name,
            "--table",
            &table_file.to_string_lossy(),
            "--nbd",
            &format!("127.0.0.1:{port}"),
        ]);
        port
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL (a crash) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait; returns the exit code.
    pub fn terminate(&mut self) -> i32 {
        let Some(mut c) = self.child.take() else {
            return -1;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return st.code().unwrap_or(-1);
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "daemon ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A deterministic xorshift generator (tests must be reproducible).
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// On a new thread, for `secs` seconds: writes of 4 KiB to 128 KiB of random bytes at random
/// 4 KiB-aligned offsets of the first `size` bytes of `dev` (seed 99), each read back and
/// compared, then a flush. Any error fails the thread (`what` says when, for the message).
/// Returns the model of what was written and how many writes were done.
pub fn writer_with_readback(
    dev: std::sync::Arc<dyn tables::BlockDevice>,
    size: usize,
    secs: u64,
    what: &'static str,
) -> std::thread::JoinHandle<(Vec<u8>, usize)> {
    use tables::io::{read_blocking, write_blocking};
    use tables::{Bytes, WriteFlags};
    std::thread::spawn(move || {
        let mut rng = Rng(99);
        let mut model = vec![0u8; size];
        let until = Instant::now() + Duration::from_secs(secs);
        let mut n = 0;
        while Instant::now() < until {
            let len = (1 + rng.below(32)) as usize * 4096;
            let off = rng.below((size - len) as u64 / 4096) as usize * 4096;
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            write_blocking(&*dev, Bytes(off as u64), &data, WriteFlags::default())
                .unwrap_or_else(|e| panic!("a write failed {what}: {e}"));
            model[off..off + len].copy_from_slice(&data);
            let mut got = vec![0u8; len];
            read_blocking(&*dev, Bytes(off as u64), &mut got)
                .unwrap_or_else(|e| panic!("a read failed {what}: {e}"));
            assert!(got == data, "read-back differs at {off}");
            n += 1;
        }
        iort::block_on(dev.flush())
            .expect("an I/O runtime")
            .unwrap_or_else(|e| panic!("the flush failed {what}: {e}"));
        (model, n)
    })
}

/// Waits (up to 20 s) until something accepts on 127.0.0.1:`port`.
pub fn wait_port(port: u16) {
    let until = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < until,
            "server on port {port} never came up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A peer server process (nbdkit, qemu-nbd) on 127.0.0.1, killed on drop.
pub struct PeerServer {
    child: Child,
}

impl PeerServer {
    /// `nbdkit ARGS` on `port` (plugin and filters in `args`), once it accepts.
    pub fn nbdkit(port: u16, args: &[&str]) -> PeerServer {
        require_tool("nbdkit");
        let child = Command::new("nbdkit")
            .args(["-f", "--exit-with-parent", "-i", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .args(args)
            .stderr(Stdio::null())
            .spawn()
            .expect("start nbdkit");
        wait_port(port);
        PeerServer { child }
    }

    /// `qemu-nbd` serving `file` raw as export `disk` on `port`, once it accepts.
    pub fn qemu_nbd(port: u16, file: &Path) -> PeerServer {
        require_tool("qemu-nbd");
        let child = Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "-b",
                "127.0.0.1",
                "-e",
                "8",
                "-x",
                "disk",
                "-p",
            ])
            .arg(port.to_string())
            .arg(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-nbd");
        wait_port(port);
        PeerServer { child }
    }

    /// Kills the server (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The server side of a valid NBD handshake on `s` (fixed newstyle; structured replies
/// refused, `NBD_OPT_GO` answered with an export of `size` bytes that takes flushes), for fake
/// servers that then misbehave.
pub fn fake_nbd_handshake(s: &mut TcpStream, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    s.write_all(&0x4e42444d41474943u64.to_be_bytes())?;
    s.write_all(&0x49484156454f5054u64.to_be_bytes())?;
    s.write_all(&3u16.to_be_bytes())?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    loop {
        let mut oh = [0u8; 16];
        s.read_exact(&mut oh)?;
        let opt = u32::from_be_bytes([oh[8], oh[9], oh[10], oh[11]]);
        let len = u32::from_be_bytes([oh[12], oh[13], oh[14], oh[15]]);
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        let mut rep = |kind: u32, d: &[u8]| -> std::io::Result<()> {
            s.write_all(&0x0003e889045565a9u64.to_be_bytes())?;
            s.write_all(&opt.to_be_bytes())?;
            s.write_all(&kind.to_be_bytes())?;
            s.write_all(&(d.len() as u32).to_be_bytes())?;
            s.write_all(d)
        };
        if opt == 7 {
            let mut info = vec![0u8, 0];
            info.extend_from_slice(&size.to_be_bytes());
            info.extend_from_slice(&(1u16 | 4).to_be_bytes());
            rep(3, &info)?;
            return rep(1, &[]);
        }
        rep((1 << 31) + 1, &[])?;
    }
}

/// A CA (`ca-cert.pem`, `ca-key.pem`) and a server certificate for 127.0.0.1 and localhost
/// (`server-cert.pem`, `server-key.pem` mode 0600) in `dir`: nbdkit's and qemu's file names.
pub fn make_test_certs(dir: &Path, cn: &str) {
    require_tool("openssl");
    let sh = |script: &str| {
        let o = Command::new("bash")
            .arg("-c")
            .arg(script)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(&format!(
        "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout ca-key.pem -out ca-cert.pem -days 2 -subj /CN={cn} 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
         -keyout server-key.pem -out server.csr -subj /CN=127.0.0.1 2>/dev/null && \
         printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\nextendedKeyUsage=serverAuth\\n' > ext && \
         openssl x509 -req -in server.csr -CA ca-cert.pem -CAkey ca-key.pem -CAcreateserial \
         -out server-cert.pem -days 2 -extfile ext 2>/dev/null && chmod 600 server-key.pem"
    ));
}

/// One logical unit a [`Tgtd`] serves: a file behind LUN `lun` of target `iqn`.
#[derive(Clone, Debug)]
pub struct TgtLun {
    /// Target IQN.
    pub iqn: String,
    /// Logical unit number (1 and up: tgtd's LUN 0 is its controller).
    pub lun: u32,
    /// Backing file (`--bstype rdwr`).
    pub file: PathBuf,
    /// Logical block size: 512 or 4096.
    pub block_size: u32,
    /// Thin provisioning on: the LUN advertises UNMAP and WRITE SAME in its VPD pages.
    pub thin: bool,
}

/// A `tgtd` iSCSI target on 127.0.0.1:`port` with its own control socket (so tests in
/// parallel do not meet), configured with `tgtadm`. Its configuration is remembered, so
/// [`Tgtd::restart`] after [`Tgtd::kill`] brings the same targets back. On drop it is torn
/// down as tgtd needs (it ignores SIGTERM while targets exist): targets deleted, the system
/// set offline and deleted, then the process killed if it is still there.
pub struct Tgtd {
    child: Option<Child>,
    /// The iSCSI portal's port.
    pub port: u16,
    control: u16,
    log: PathBuf,
    luns: Vec<TgtLun>,
    /// (IQN, user, password) CHAP accounts bound to targets.
    chap: Vec<(String, String, String)>,
    /// Run inside this network namespace, reached at this address (else on 127.0.0.1).
    netns: Option<(String, String)>,
}

impl Tgtd {
    /// Starts tgtd on a free port (its log in `dir`) and waits until it accepts.
    pub fn start(dir: &Path) -> Tgtd {
        require_tools(&["tgtd", "tgtadm"]);
        let port = free_port();
        let mut t = Tgtd {
            child: None,
            port,
            control: free_tgtd_control(port),
            log: dir.join(format!("tgtd-{port}.log")),
            luns: Vec::new(),
            chap: Vec::new(),
            netns: None,
        };
        t.spawn();
        t
    }

    /// Starts tgtd inside network namespace `ns` (a [`netns::NetHost`]), its portal on port
    /// 3260 of every address there; waits until it accepts at `addr`. Its control socket is
    /// a file, so `tgtadm` reaches it from here.
    pub fn start_in(dir: &Path, ns: &str, addr: &str) -> Tgtd {
        require_tools(&["tgtd", "tgtadm"]);
        let port = 3260;
        let mut t = Tgtd {
            child: None,
            port,
            control: free_tgtd_control(free_port()),
            log: dir.join(format!("tgtd-{ns}.log")),
            luns: Vec::new(),
            chap: Vec::new(),
            netns: Some((ns.to_string(), addr.to_string())),
        };
        t.spawn();
        t
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}", self.control));
        let errf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("tgtd log");
        let (mut cmd, portal) = match &self.netns {
            // `ip netns exec` execs tgtd: the child is tgtd itself.
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "tgtd"]);
                (c, "0.0.0.0")
            }
            None => (Command::new("tgtd"), "127.0.0.1"),
        };
        let child = cmd
            .args(["-f", "-C", &self.control.to_string(), "--iscsi"])
            .arg(format!("portal={portal}:{}", self.port))
            .stdout(Stdio::null())
            .stderr(errf)
            .spawn()
            .expect("start tgtd");
        self.child = Some(child);
        match &self.netns {
            Some((_, addr)) => {
                let until = Instant::now() + Duration::from_secs(20);
                while TcpStream::connect((addr.as_str(), self.port)).is_err() {
                    assert!(Instant::now() < until, "tgtd at {addr} never came up");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            None => wait_port(self.port),
        }
        // The control socket may lag the portal.
        let until = Instant::now() + Duration::from_secs(10);
        while self.adm(&["--mode", "sys", "--op", "show"]).is_err() {
            assert!(
                Instant::now() < until,
                "tgtd's control socket never answered"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `tgtadm -C N --lld iscsi ARGS` (for at most 20 s).
    pub fn adm(&self, args: &[&str]) -> Result<String> {
        run_ok(
            Command::new("timeout")
                .args([
                    "20",
                    "tgtadm",
                    "-C",
                    &self.control.to_string(),
                    "--lld",
                    "iscsi",
                ])
                .args(args),
        )
    }

    /// The target IQNs, in the order they were added (target ids 1, 2, ...).
    fn iqns(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for l in &self.luns {
            if !seen.contains(&l.iqn.as_str()) {
                seen.push(&l.iqn);
            }
        }
        seen
    }

    /// The target id of `iqn` (the next free one if it is new).
    fn tid(&self, iqn: &str) -> usize {
        let seen = self.iqns();
        seen.iter()
            .position(|x| *x == iqn)
            .map_or(seen.len() + 1, |i| i + 1)
    }

    fn configure(&self, l: &TgtLun, new_target: bool) {
        let tid = self.tid(&l.iqn).to_string();
        if new_target {
            self.adm(&[
                "--mode",
                "target",
                "--op",
                "new",
                "--tid",
                &tid,
                "--targetname",
                &l.iqn,
            ])
            .expect("tgtadm: new target");
            self.adm(&[
                "--mode",
                "target",
                "--op",
                "bind",
                "--tid",
                &tid,
                "--initiator-address",
                "ALL",
            ])
            .expect("tgtadm: bind ALL");
        }
        self.adm(&[
            "--mode",
            "logicalunit",
            "--op",
            "new",
            "--tid",
            &tid,
            "--lun",
            &l.lun.to_string(),
            "--bstype",
            "rdwr",
            "-b",
            &l.file.to_string_lossy(),
            "--blocksize",
            &l.block_size.to_string(),
        ])
        .expect("tgtadm: new logical unit");
        if l.thin {
            self.lun_params(&l.iqn, l.lun, "thin_provisioning=1");
        }
    }

    fn configure_chap(&self, iqn: &str, user: &str, password: &str) {
        let tid = self.tid(iqn).to_string();
        self.adm(&[
            "--mode",
            "account",
            "--op",
            "new",
            "--user",
            user,
            "--password",
            password,
        ])
        .expect("tgtadm: new account");
        self.adm(&[
            "--mode", "account", "--op", "bind", "--tid", &tid, "--user", user,
        ])
        .expect("tgtadm: bind account");
    }

    /// Serves `l` (creating its target the first time its IQN is seen).
    pub fn add_lun(&mut self, l: TgtLun) {
        let new_target = !self.luns.iter().any(|x| x.iqn == l.iqn);
        self.luns.push(l.clone());
        self.configure(&l, new_target);
    }

    /// Requires CHAP (incoming user `user`, secret `password`) to log in to `iqn`.
    pub fn add_chap(&mut self, iqn: &str, user: &str, password: &str) {
        self.configure_chap(iqn, user, password);
        self.chap
            .push((iqn.to_string(), user.to_string(), password.to_string()));
    }

    /// `iscsi://127.0.0.1:PORT/IQN/LUN` followed by `rest` (`?options`, or a user goes in
    /// with [`Tgtd::uri_as`]).
    pub fn uri(&self, iqn: &str, lun: u32, rest: &str) -> String {
        format!("iscsi://127.0.0.1:{}/{iqn}/{lun}{rest}", self.port)
    }

    /// [`Tgtd::uri`] with a CHAP user.
    pub fn uri_as(&self, user: &str, iqn: &str, lun: u32, rest: &str) -> String {
        format!("iscsi://{user}@127.0.0.1:{}/{iqn}/{lun}{rest}", self.port)
    }

    /// SIGKILL (a crash) and reap: sessions break, nothing is torn down.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts tgtd again on the same port with the same targets, LUNs and accounts.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        let mut seen: Vec<String> = Vec::new();
        for l in &self.luns {
            let new_target = !seen.contains(&l.iqn);
            seen.push(l.iqn.clone());
            self.configure(l, new_target);
        }
        for (iqn, u, p) in &self.chap {
            self.configure_chap(iqn, u, p);
        }
    }

    /// `tgtadm --mode logicalunit --op update --params PARAMS` on a served LUN (e.g.
    /// `readonly=1`; not replayed by [`Tgtd::restart`]).
    pub fn lun_params(&self, iqn: &str, lun: u32, params: &str) {
        let tid = self.tid(iqn).to_string();
        self.adm(&[
            "--mode",
            "logicalunit",
            "--op",
            "update",
            "--tid",
            &tid,
            "--lun",
            &lun.to_string(),
            "--params",
            params,
        ])
        .expect("tgtadm: update logical unit");
    }

    /// Sends `sig` to tgtd (SIGSTOP makes a target that stops answering, SIGCONT wakes it).
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// tgtd's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A control number N for a new tgtd (its socket is /var/run/tgtd/socket.N, N from 1 to
/// 32767) that no running tgtd holds: a running one keeps `socket.N.lock` locked.
fn free_tgtd_control(seed: u16) -> u16 {
    use std::os::fd::AsRawFd;
    let _ = std::fs::create_dir_all("/var/run/tgtd");
    for i in 0..32767u32 {
        let n = ((u32::from(seed) + i) % 32767 + 1) as u16;
        let lock = format!("/var/run/tgtd/socket.{n}.lock");
        let Ok(f) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
        else {
            continue;
        };
        // SAFETY: flock on a descriptor `f` keeps open; released when `f` closes.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return n;
        }
    }
    panic!("no free tgtd control number");
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        // A test that failed half way may have left it stopped.
        self.signal(libc::SIGCONT);
        let Some(mut c) = self.child.take() else {
            return;
        };
        for tid in 1..=self.iqns().len() {
            let _ = self.adm(&[
                "--mode",
                "target",
                "--op",
                "delete",
                "--force",
                "--tid",
                &tid.to_string(),
            ]);
        }
        let _ = self.adm(&[
            "--mode", "sys", "--op", "update", "--name", "State", "--value", "offline",
        ]);
        let _ = run(Command::new("timeout").args([
            "20",
            "tgtadm",
            "-C",
            &self.control.to_string(),
            "--op",
            "delete",
            "--mode",
            "system",
        ]));
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        let sock = format!("/var/run/tgtd/socket.{}", self.control);
        let _ = std::fs::remove_file(format!("{sock}.lock"));
        let _ = std::fs::remove_file(sock);
    }
}
