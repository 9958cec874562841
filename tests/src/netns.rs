//! Storage "hosts" for multi-host tests: each a network namespace joined to ours by a veth
//! pair with addresses on that link only (10.231.K.1 ours, 10.231.K.2 the host's), so a host
//! can be cut off and brought back. Nothing else is ever contacted. Everything made here (the
//! namespace, the veth pair, processes started inside) is removed on drop, also when a test
//! fails.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::require_tool;

fn sh(args: &[&str]) -> Result<(), String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// One storage host in its own network namespace.
pub struct NetHost {
    ns: String,
    veth: String,
    /// The host's address, as clients in our namespace reach it.
    pub addr: String,
    children: Vec<Child>,
}

impl Default for NetHost {
    fn default() -> NetHost {
        NetHost::new()
    }
}

impl NetHost {
    /// Makes a namespace and its link. Fails the test loudly without root or `ip`.
    pub fn new() -> NetHost {
        crate::require_root();
        require_tool("ip");
        // Claim a free slot: `ip netns add` is atomic, so two tests never share one.
        let start = (std::process::id() as usize * 7919) % 250;
        for i in 0..250 {
            let k = (start + i) % 250 + 1;
            let ns = format!("volmgr-t{k}");
            if sh(&["ip", "netns", "add", &ns]).is_err() {
                continue;
            }
            let veth = format!("vmt{k}h");
            let peer = format!("vmt{k}n");
            let mut h = NetHost {
                ns: ns.clone(),
                veth: veth.clone(),
                addr: format!("10.231.{k}.2"),
                children: Vec::new(),
            };
            // A stale pair from a killed run would block this slot: remove it first.
            let _ = sh(&["ip", "link", "del", &veth]);
            let ours = format!("10.231.{k}.1/24");
            let theirs = format!("10.231.{k}.2/24");
            let steps: Vec<Vec<&str>> = vec![
                vec![
                    "ip", "link", "add", &veth, "type", "veth", "peer", "name", &peer,
                ],
                vec!["ip", "link", "set", &peer, "netns", &ns],
                vec!["ip", "addr", "add", &ours, "dev", &veth],
                vec!["ip", "link", "set", &veth, "up"],
                vec![
                    "ip", "netns", "exec", &ns, "ip", "addr", "add", &theirs, "dev", &peer,
                ],
                vec!["ip", "netns", "exec", &ns, "ip", "link", "set", &peer, "up"],
                vec!["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"],
            ];
            for s in steps {
                if let Err(e) = sh(&s) {
                    panic!("setting up network namespace {ns}: {e}");
                }
            }
            h.wait_reachable();
            return h;
        }
        panic!("no free network-namespace slot (volmgr-t1..250 all exist: stale ones?)");
    }

    fn wait_reachable(&mut self) {
        // The pair is usable once both ends have carrier (IPv4 needs no address probing).
        let t0 = Instant::now();
        loop {
            let o = Command::new("ip")
                .args(["link", "show", "dev", &self.veth])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if o.contains("LOWER_UP") {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{} never came up: {o}",
                self.veth
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts `program args` inside the namespace; it is killed on drop.
    pub fn spawn(&mut self, program: &str, args: &[&str]) -> &mut Child {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {program} in {}: {e}", self.ns));
        self.children.push(child);
        self.children.last_mut().expect("just pushed")
    }

    /// Kills every process started in the namespace.
    pub fn kill_all(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.children.clear();
    }

    /// Cuts the host off the hard way: every packet to and from it is silently dropped (an
    /// nftables rule inside its namespace), so connections hang rather than fail.
    pub fn blackhole(&self) {
        require_tool("nft");
        let rules = "add table inet cut\n\
                     add chain inet cut in { type filter hook input priority 0 ; policy drop ; }\n\
                     add chain inet cut out { type filter hook output priority 0 ; policy drop ; }\n";
        let f = std::env::temp_dir().join(format!("{}.nft", self.ns));
        std::fs::write(&f, rules).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let path = f.to_string_lossy().into_owned();
        let r = sh(&["ip", "netns", "exec", &self.ns, "nft", "-f", &path]);
        let _ = std::fs::remove_file(&f);
        r.unwrap_or_else(|e| panic!("{e}"));
    }

    /// Takes the link down (connections fail at once: no route).
    pub fn link_down(&self) {
        sh(&["ip", "link", "set", &self.veth, "down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Undoes [`NetHost::blackhole`] and [`NetHost::link_down`].
    pub fn restore(&mut self) {
        let _ = sh(&[
            "ip", "netns", "exec", &self.ns, "nft", "delete", "table", "inet", "cut",
        ]);
        sh(&["ip", "link", "set", &self.veth, "up"]).unwrap_or_else(|e| panic!("{e}"));
        self.wait_reachable();
    }

    /// Waits until something listens on `port` of this host.
    pub fn wait_port(&self, port: u16) {
        let t0 = Instant::now();
        let addr = format!("{}:{port}", self.addr);
        while std::net::TcpStream::connect_timeout(
            &addr.parse().expect("an address"),
            Duration::from_millis(500),
        )
        .is_err()
        {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "nothing listens on {addr}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NetHost {
    fn drop(&mut self) {
        self.kill_all();
        let _ = sh(&["ip", "link", "del", &self.veth]);
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}
