//! A single-node Ceph cluster for tests, in a temporary directory: one monitor on a free
//! port and one or more OSDs (BlueStore on sparse files, so an OSD killed and started again
//! keeps its data), auth none (or cephx), no manager (not needed for I/O). Started in about
//! 10 s; every daemon runs in the foreground as our child with `PR_SET_PDEATHSIG`, and is
//! killed on drop, so a failing (or killed) test leaves nothing behind.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::{free_port, require_root, require_tools};

/// Auth for a test cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CephAuth {
    /// `auth ... required = none`.
    None,
    /// cephx: `client.admin`'s keyring is written (mode 0600) to [`CephCluster::keyring`].
    Cephx,
}

/// A running test cluster (see the module docs).
pub struct CephCluster {
    dir: tempfile::TempDir,
    /// `ceph.conf` (its `[global]` names the monitor; `CEPH_CONF` for fio's engines).
    pub conf: PathBuf,
    /// The monitor's port.
    pub port: u16,
    /// With cephx: `client.admin`'s keyring (0600).
    pub keyring: Option<PathBuf>,
    mon: Option<Child>,
    osds: Vec<Option<Child>>,
}

fn spawn_daemon(cmd: &mut Command, log: &Path) -> Child {
    let errf = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("daemon log");
    // SAFETY: the closure only calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            // Dies with the test process, whatever way it ends.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdout(Stdio::null())
        .stderr(errf)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"))
}

impl CephCluster {
    /// Starts a monitor and `osds` OSDs, creates pool `rbd` (replicated `size`, min_size 1,
    /// application rbd), and returns once an image can be created in it.
    pub fn start(osds: usize, size: u32, auth: CephAuth) -> CephCluster {
        require_root();
        require_tools(&["ceph-mon", "ceph-osd", "ceph", "rbd", "rados", "monmaptool"]);
        let mut dir = tempfile::Builder::new()
            .prefix("ceph-test")
            .tempdir()
            .expect("temp dir");
        // To look at a cluster after a failure: its directory stays.
        dir.disable_cleanup(std::env::var_os("CEPH_TEST_KEEP").is_some());
        let d = dir.path();
        // The OSDs take ports from 6800 up: the monitor's is an ephemeral one.
        let port = free_port();
        let fsid = {
            let mut b = [0u8; 16];
            use std::io::Read;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .expect("/dev/urandom");
            let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
            format!(
                "{}-{}-{}-{}-{}",
                &h[..8],
                &h[8..12],
                &h[12..16],
                &h[16..20],
                &h[20..]
            )
        };
        let auth_mode = match auth {
            CephAuth::None => "none",
            CephAuth::Cephx => "cephx",
        };
        let conf = d.join("ceph.conf");
        let dd = d.display();
        let text = format!(
            "[global]\nfsid = {fsid}\nmon host = v1:127.0.0.1:{port}\nmon initial members = a\n\
             auth cluster required = {auth_mode}\nauth service required = {auth_mode}\n\
             auth client required = {auth_mode}\n\
             osd pool default size = {size}\nosd pool default min size = 1\n\
             mon allow pool size one = true\nosd crush chooseleaf type = 0\n\
             osd objectstore = bluestore\nbluestore block create = true\n\
             bluestore block size = 2147483648\nbluestore fsck on mount = false\n\
             osd heartbeat interval = 1\nosd heartbeat grace = 4\n\
             mon osd down out interval = 0\nosd pool default pg autoscale mode = off\n\
             run dir = {dd}/run\nlog file = {dd}/log/$name.log\n\
             admin socket = {dd}/run/$name.asok\n\
             [mon.a]\nmon data = {dd}/mon\n[osd]\nosd data = {dd}/osd$id\n"
        );
        std::fs::write(&conf, text).expect("ceph.conf");
        for sub in ["run", "log", "mon"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let keyring = d.join("keyring");
        run_text(
            Command::new("ceph-authtool")
                .arg("--create-keyring")
                .arg(&keyring)
                .args(["--gen-key", "-n", "mon.", "--cap", "mon", "allow *"]),
        );
        if auth == CephAuth::Cephx {
            run_text(Command::new("ceph-authtool").arg(&keyring).args([
                "--gen-key",
                "-n",
                "client.admin",
                "--cap",
                "mon",
                "allow *",
                "--cap",
                "osd",
                "allow *",
                "--cap",
                "mgr",
                "allow *",
            ]));
        }
        std::fs::set_permissions(&keyring, std::fs::Permissions::from_mode(0o600))
            .expect("chmod keyring");
        let monmap = d.join("monmap");
        run_text(
            Command::new("monmaptool")
                .args(["--create", "--addv", "a"])
                .arg(format!("v1:127.0.0.1:{port}"))
                .args(["--fsid", &fsid])
                .arg(&monmap),
        );
        run_text(
            Command::new("ceph-mon")
                .arg("-c")
                .arg(&conf)
                .args(["--mkfs", "-i", "a", "--monmap"])
                .arg(&monmap)
                .arg("--keyring")
                .arg(&keyring),
        );
        let mut c = CephCluster {
            conf,
            port,
            keyring: (auth == CephAuth::Cephx).then(|| keyring.clone()),
            mon: None,
            osds: Vec::new(),
            dir,
        };
        c.start_mon();
        // The first commands may meet a monitor still starting (EPERM, "wrong fsid").
        let until = Instant::now() + Duration::from_secs(30);
        while !c
            .base("ceph")
            .args(["mon", "stat"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(Instant::now() < until, "the monitor never answered");
            std::thread::sleep(Duration::from_millis(200));
        }
        for i in 0..osds {
            c.ceph(&["osd", "create"]);
            if auth == CephAuth::Cephx {
                // Each OSD's key, in the keyring its data directory holds.
                let okr = c.dir.path().join(format!("osd{i}")).join("keyring");
                std::fs::create_dir_all(okr.parent().expect("osd dir")).expect("mkdir osd");
                run_text(
                    Command::new("ceph-authtool")
                        .arg("--create-keyring")
                        .arg(&okr)
                        .args(["--gen-key", "-n", &format!("osd.{i}")]),
                );
                c.ceph_args(&[
                    "auth",
                    "add",
                    &format!("osd.{i}"),
                    "osd",
                    "allow *",
                    "mon",
                    "allow profile osd",
                    "-i",
                    &okr.display().to_string(),
                ]);
            }
            std::fs::create_dir_all(c.dir.path().join(format!("osd{i}"))).expect("mkdir osd");
            let mut mk = Command::new("ceph-osd");
            mk.arg("-c")
                .arg(&c.conf)
                .args(["-i", &i.to_string(), "--mkfs"]);
            if auth == CephAuth::Cephx {
                mk.arg("--keyring")
                    .arg(c.dir.path().join(format!("osd{i}")).join("keyring"));
            }
            run_text(&mut mk);
            c.osds.push(None);
            c.start_osd(i);
        }
        for i in 0..osds {
            c.wait_osd(i, true, Duration::from_secs(60));
        }
        c.ceph(&["osd", "pool", "create", "rbd", "8"]);
        c.ceph(&["osd", "pool", "application", "enable", "rbd", "rbd"]);
        // An image creation waits for the pool's placement groups to be active.
        c.rbd(&["create", "--size", "1M", "rbd/ready"]);
        c
    }

    /// The cluster's directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join("log").join(format!("{name}.stderr"))
    }

    fn base(&self, tool: &str) -> Command {
        let mut c = Command::new("timeout");
        c.args(["60", tool, "-c"]).arg(&self.conf);
        if let Some(k) = &self.keyring {
            c.arg("--keyring").arg(k);
        }
        c
    }

    /// Starts (again) the monitor.
    pub fn start_mon(&mut self) {
        let mut cmd = Command::new("ceph-mon");
        cmd.arg("-f").arg("-c").arg(&self.conf).args(["-i", "a"]);
        self.mon = Some(spawn_daemon(&mut cmd, &self.log("mon")));
    }

    /// Starts (again) OSD `i`.
    pub fn start_osd(&mut self, i: usize) {
        let mut cmd = Command::new("ceph-osd");
        cmd.arg("-f")
            .arg("-c")
            .arg(&self.conf)
            .args(["-i", &i.to_string()]);
        if self.keyring.is_some() {
            cmd.arg("--keyring")
                .arg(self.dir.path().join(format!("osd{i}")).join("keyring"));
        }
        let child = spawn_daemon(&mut cmd, &self.log(&format!("osd{i}")));
        self.osds[i] = Some(child);
    }

    /// Kills OSD `i` (SIGKILL) and reaps it.
    pub fn kill_osd(&mut self, i: usize) {
        if let Some(mut c) = self.osds[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the monitor (SIGKILL).
    pub fn kill_mon(&mut self) {
        if let Some(mut c) = self.mon.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether OSD `i` is `up` in the OSD map.
    pub fn osd_up(&self, i: usize) -> bool {
        let o = self.ceph(&["osd", "dump"]);
        o.lines().any(|l| l.starts_with(&format!("osd.{i} up ")))
    }

    /// [`CephCluster::osd_up`], or `None` while the monitor does not answer (it refuses
    /// commands with EPERM for a moment while it starts or holds an election, more so on a
    /// busy machine).
    fn osd_state(&self, i: usize) -> Option<bool> {
        let o = self.base("ceph").args(["osd", "dump"]).output().ok()?;
        o.status.success().then(|| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(&format!("osd.{i} up ")))
        })
    }

    /// Waits (up to `limit`) until OSD `i` is `up` (or `down`, with `up = false`). Waiting
    /// for `up`, an OSD process that has exited is started again: Ceph 16.2's OSD sometimes
    /// sends its first monitor command before it has the monitor map and gives up ("wrong
    /// fsid").
    pub fn wait_osd(&mut self, i: usize, up: bool, limit: Duration) {
        let until = Instant::now() + limit;
        while self.osd_state(i) != Some(up) {
            let exited = self.osds[i]
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if up && exited {
                self.osds[i] = None;
                self.start_osd(i);
            }
            assert!(
                Instant::now() < until,
                "osd.{i} not {} within {limit:?}",
                if up { "up" } else { "down" }
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn ceph_args(&self, args: &[&str]) -> String {
        let mut c = self.base("ceph");
        c.args(args);
        run_text(&mut c)
    }

    /// `ceph ARGS` (at most 60 s), asserted to succeed; its stdout.
    pub fn ceph(&self, args: &[&str]) -> String {
        self.ceph_args(args)
    }

    /// `rbd ARGS` (at most 60 s), asserted to succeed; its stdout.
    pub fn rbd(&self, args: &[&str]) -> String {
        let mut c = self.base("rbd");
        c.args(args);
        run_text(&mut c)
    }

    /// `rados ARGS` (at most 60 s) with its raw output.
    pub fn rados_out(&self, args: &[&str]) -> Output {
        let mut c = self.base("rados");
        c.args(args);
        c.output().expect("running rados")
    }

    /// The bytes of an RBD image as `rbd export` gives them.
    pub fn rbd_export(&self, image: &str) -> Vec<u8> {
        let out = self.dir.path().join("export.tmp");
        let _ = std::fs::remove_file(&out);
        self.rbd(&["export", image, &out.display().to_string()]);
        let b = std::fs::read(&out).expect("read rbd export");
        let _ = std::fs::remove_file(&out);
        b
    }

    /// The bytes of RADOS object `obj` in `pool` as `rados get` gives them; None if it does
    /// not exist.
    pub fn rados_get(&self, pool: &str, obj: &str) -> Option<Vec<u8>> {
        let out = self.dir.path().join("get.tmp");
        let _ = std::fs::remove_file(&out);
        let o = self.rados_out(&["-p", pool, "get", obj, &out.display().to_string()]);
        if !o.status.success() {
            let e = String::from_utf8_lossy(&o.stderr);
            assert!(e.contains("No such file"), "rados get {obj}: {e}");
            return None;
        }
        let b = std::fs::read(&out).expect("read rados get");
        let _ = std::fs::remove_file(&out);
        Some(b)
    }

    /// The URI options that reach this cluster (`conf=`, and with cephx `keyring=`).
    pub fn opts(&self) -> String {
        let mut s = format!("conf={}", self.conf.display());
        if let Some(k) = &self.keyring {
            s.push_str(&format!("&keyring={}", k.display()));
        }
        s
    }
}

impl Drop for CephCluster {
    fn drop(&mut self) {
        for i in 0..self.osds.len() {
            self.kill_osd(i);
        }
        self.kill_mon();
    }
}

/// Runs `cmd`, asserting success; its stdout.
fn run_text(cmd: &mut Command) -> String {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
