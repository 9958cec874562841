//! Storage "hosts" for multi-host tests: each a network namespace joined to ours by a veth
//! pair with addresses on that link only (10.231.K.1 ours, 10.231.K.2 the host's), so a host
//! can be cut off and brought back. A host may have more links, one per network (link J on
//! 10.(231+J).K.0/24, as VastSky's hosts sit on two networks); each can be cut alone. Nothing else is ever contacted. Everything made here (the
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
    /// Our end of each link.
    veths: Vec<String>,
    /// The host's address, as clients in our namespace reach it (on its first link).
    pub addr: String,
    /// Its address on each link.
    pub addrs: Vec<String>,
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
        NetHost::with_links(1)
    }

    /// Makes a namespace with `links` links (1..=4), one per network.
    pub fn with_links(links: usize) -> NetHost {
        assert!((1..=4).contains(&links), "{links} links");
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
            let mut h = NetHost {
                ns: ns.clone(),
                veths: Vec::new(),
                addr: format!("10.231.{k}.2"),
                addrs: Vec::new(),
                children: Vec::new(),
            };
            for j in 0..links {
                let (veth, peer) = if j == 0 {
                    (format!("vmt{k}h"), format!("vmt{k}n"))
                } else {
                    (format!("vmt{k}h{j}"), format!("vmt{k}n{j}"))
                };
                let net = 231 + j;
                // A stale pair from a killed run would block this slot: remove it first.
                let _ = sh(&["ip", "link", "del", &veth]);
                let ours = format!("10.{net}.{k}.1/24");
                let theirs = format!("10.{net}.{k}.2/24");
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
                ];
                for s in steps {
                    if let Err(e) = sh(&s) {
                        panic!("setting up network namespace {ns}: {e}");
                    }
                }
                h.veths.push(veth);
                h.addrs.push(format!("10.{net}.{k}.2"));
            }
            if let Err(e) = sh(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"]) {
                panic!("setting up network namespace {ns}: {e}");
            }
            h.wait_reachable();
            return h;
        }
        panic!("no free network-namespace slot (volmgr-t1..250 all exist: stale ones?)");
    }

    fn wait_reachable(&mut self) {
        for j in 0..self.veths.len() {
            self.wait_link(j);
        }
    }

    fn wait_link(&self, j: usize) {
        // The pair is usable once both ends have carrier (IPv4 needs no address probing).
        let veth = &self.veths[j];
        let t0 = Instant::now();
        loop {
            let o = Command::new("ip")
                .args(["link", "show", "dev", veth])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            if o.contains("LOWER_UP") {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{veth} never came up: {o}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The namespace's name (for `ip netns exec NAME ...`).
    pub fn name(&self) -> &str {
        &self.ns
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

    /// Takes every link down (connections fail at once: no route).
    pub fn link_down(&self) {
        for j in 0..self.veths.len() {
            self.link_down_one(j);
        }
    }

    /// Takes link `j` down: the host stays reachable on its other links.
    pub fn link_down_one(&self, j: usize) {
        sh(&["ip", "link", "set", &self.veths[j], "down"]).unwrap_or_else(|e| panic!("{e}"));
    }

    /// Brings link `j` back up.
    pub fn link_up_one(&self, j: usize) {
        sh(&["ip", "link", "set", &self.veths[j], "up"]).unwrap_or_else(|e| panic!("{e}"));
        self.wait_link(j);
    }

    /// Undoes [`NetHost::blackhole`] and [`NetHost::link_down`].
    pub fn restore(&mut self) {
        let _ = sh(&[
            "ip", "netns", "exec", &self.ns, "nft", "delete", "table", "inet", "cut",
        ]);
        for veth in &self.veths {
            sh(&["ip", "link", "set", veth, "up"]).unwrap_or_else(|e| panic!("{e}"));
        }
        self.wait_reachable();
    }

    /// Waits until something listens on `port` of this host (on its first link).
    pub fn wait_port(&self, port: u16) {
        self.wait_port_on(&self.addr, port);
    }

    /// Waits until something listens on `port` at `addr`, one of this host's addresses.
    pub fn wait_port_on(&self, addr: &str, port: u16) {
        let t0 = Instant::now();
        let addr = format!("{addr}:{port}");
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
        for veth in &self.veths {
            let _ = sh(&["ip", "link", "del", veth]);
        }
        let _ = sh(&["ip", "netns", "del", &self.ns]);
    }
}
