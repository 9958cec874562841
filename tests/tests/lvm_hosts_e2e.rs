//! PVs on other storage hosts: PVs created on NBD exports by URI, their hosts (from the URI,
//! or a `host:` tag set with `pvchange`), raid placement that never puts two images of an LV
//! on one host, and the reports that show it (`pvs -o +host,missing,tags`, `lvs -o
//! +devices`). The exports are nbdkit's `file` plugin on 127.0.0.1; the daemon activates the
//! raid LV over them and data written through it lands on three of the four hosts' files.
//!
//! Needs nbdkit and nbdcopy; a missing one fails the test loudly.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e2e::{free_port, pseudo_random, require_tools, run_ok, sparse_file, DaemonProc, PeerServer};

struct Hosts {
    _dir: tempfile::TempDir,
    root: PathBuf,
    servers: Vec<Option<PeerServer>>,
    ports: Vec<u16>,
    files: Vec<PathBuf>,
    uris: Vec<String>,
}

impl Hosts {
    fn new(n: usize) -> Hosts {
        Hosts::with_options(n, "")
    }

    /// `n` hosts whose URIs end with `query` (`?reconnect-delay=2...`, or empty).
    fn with_options(n: usize, query: &str) -> Hosts {
        require_tools(&["nbdkit", "nbdcopy"]);
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let (mut servers, mut files, mut uris) = (Vec::new(), Vec::new(), Vec::new());
        let mut ports = Vec::new();
        for i in 0..n {
            let f = root.join(format!("host{i}.img"));
            sparse_file(&f, 64 << 20).unwrap();
            let port = free_port();
            servers.push(Some(PeerServer::nbdkit(
                port,
                &["file", &f.display().to_string()],
            )));
            files.push(f);
            ports.push(port);
            uris.push(format!("nbd://127.0.0.1:{port}/disk{query}"));
        }
        std::fs::create_dir_all(root.join("state")).unwrap();
        // An existing (empty) devices file: scans look at what it lists only, not at every
        // block device of the machine (other tests' loop devices).
        std::fs::write(root.join("lvm-devices"), "# test\n").unwrap();
        Hosts {
            _dir: dir,
            root,
            servers,
            ports,
            files,
            uris,
        }
    }

    /// `volmgr ARGS`, PVs found through the test's devices file (not --devices: the URIs
    /// pvcreate records there are what later verbs scan), against the state directory `sd`.
    fn cmd_in(&self, sd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(e2e::volmgr_bin());
        c.args(args)
            .env("VOLMGR_STATE_DIR", sd)
            .env("VOLMGR_LVM_DEVICESFILE", self.root.join("lvm-devices"));
        c
    }

    fn vm(&self, args: &[&str]) -> Output {
        self.cmd_in(&self.root.join("state"), args)
            .output()
            .expect("running volmgr")
    }

    fn ok(&self, args: &[&str]) -> String {
        run_ok(&mut self.cmd_in(&self.root.join("state"), args)).unwrap_or_else(|e| panic!("{e}"))
    }

    fn fails(&self, args: &[&str]) -> String {
        let o = self.vm(args);
        assert_eq!(
            o.status.code(),
            Some(5),
            "volmgr {args:?} should fail as lvm2 does: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    /// `pvs` rows: PV name -> (host, missing, tags).
    fn pvs(&self) -> BTreeMap<String, (String, String, String)> {
        let out = self.ok(&[
            "pvs",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "pv_name,host,missing,tags",
        ]);
        out.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.trim().split(';').collect();
                assert_eq!(f.len(), 4, "{l}");
                (
                    f[0].to_string(),
                    (f[1].to_string(), f[2].to_string(), f[3].to_string()),
                )
            })
            .collect()
    }
}

/// The PV names each raid image of `vg/lv` uses (`lvs -a -o lv_name,devices`).
fn image_devices(h: &Hosts, vg: &str, lv: &str) -> Vec<HashSet<String>> {
    let out = h.ok(&[
        "lvs",
        "-a",
        "--noheadings",
        "--separator",
        ";",
        "-o",
        "lv_name,devices",
        vg,
    ]);
    out.lines()
        .filter_map(|l| {
            let (name, devs) = l.trim().split_once(';')?;
            let name = name.trim_matches(|c| c == '[' || c == ']');
            name.starts_with(&format!("{lv}_rimage_")).then(|| {
                devs.split(',')
                    .map(|d| d.split('(').next().unwrap_or("").to_string())
                    .collect()
            })
        })
        .collect()
}

#[test]
fn raid_images_land_on_distinct_hosts_and_reports_show_them() {
    let mut h = Hosts::new(4);
    let uris: Vec<&str> = h.uris.iter().map(String::as_str).collect();

    // PVs on URIs; the devices file remembers them (a scan would never find them).
    let mut a = vec!["pvcreate"];
    a.extend(&uris);
    h.ok(&a);
    let listed = std::fs::read_to_string(h.root.join("lvm-devices")).unwrap();
    for u in &uris {
        assert!(listed.lines().any(|l| l == *u), "{u} not in {listed}");
    }
    let mut a = vec!["vgcreate", "vgh"];
    a.extend(&uris);
    h.ok(&a);
    // Every PV's host comes from its URI: all four on 127.0.0.1.
    let pvs = h.pvs();
    assert_eq!(pvs.len(), 4, "{pvs:?}");
    assert!(
        pvs.values().all(|(host, _, _)| host == "127.0.0.1"),
        "{pvs:?}"
    );

    // One host for everything: two images cannot be placed apart.
    let e = h.fails(&[
        "lvcreate", "--type", "raid1", "-m", "1", "-L", "8M", "-n", "r", "vgh",
    ]);
    assert!(e.contains("hosts"), "{e}");
    // ... unless the administrator says anything goes.
    h.ok(&[
        "lvcreate", "--type", "raid1", "-m", "1", "-L", "8M", "-n", "any", "--alloc", "anywhere",
        "vgh",
    ]);
    h.ok(&["lvremove", "-y", "vgh/any"]);

    // Name the hosts with tags (what a storage administrator does when several exports
    // share an address, or to group by rack).
    for (i, u) in uris.iter().enumerate() {
        let tag = format!("host:h{i}");
        h.ok(&["pvchange", "--addtag", &tag, u]);
    }
    let pvs = h.pvs();
    for (i, u) in uris.iter().enumerate() {
        let (host, missing, tags) = &pvs[*u];
        assert_eq!(host, &format!("h{i}"), "{pvs:?}");
        assert_eq!(missing, "", "{pvs:?}");
        assert_eq!(tags, &format!("host:h{i}"), "{pvs:?}");
    }
    // Unchanged tags are not a change; a bad tag is refused.
    let out = h.ok(&["pvchange", "--addtag", "host:h0", uris[0]]);
    assert!(out.contains("nothing to change"), "{out}");
    h.fails(&["pvchange", "--addtag", "bad tag", uris[0]]);

    // A three-way mirror: three images on three hosts.
    h.ok(&[
        "lvcreate", "--type", "raid1", "-m", "2", "-L", "8M", "-n", "r", "vgh",
    ]);
    let imgs = image_devices(&h, "vgh", "r");
    assert_eq!(imgs.len(), 3, "{imgs:?}");
    let host_of = |pv: &str| pvs.get(pv).map(|p| p.0.clone()).unwrap_or_default();
    let hosts: Vec<HashSet<String>> = imgs
        .iter()
        .map(|s| s.iter().map(|p| host_of(p)).collect())
        .collect();
    for i in 0..3 {
        assert_eq!(hosts[i].len(), 1, "{hosts:?}");
        for j in i + 1..3 {
            assert!(hosts[i].is_disjoint(&hosts[j]), "{hosts:?}");
        }
    }
    // JSON report carries the host too.
    let json = h.ok(&["pvs", "--reportformat", "json", "-o", "+host"]);
    assert!(json.contains("\"pv_host\":\"h0\""), "{json}");

    // Activate through the daemon over the NBD PVs and write through the mirror: the bytes
    // land in the files of exactly the three hosts that hold an image.
    let d = DaemonProc::start(&h.root.join("state"));
    let vmd = |args: &[&str]| -> String {
        run_ok(&mut h.cmd_in(&d.state, args)).unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
    };
    vmd(&["lvchange", "-ay", "vgh/r", "--nbd", "127.0.0.1:0"]);
    let uri = vmd(&["lvs", "--noheadings", "-o", "lv_dm_path", "vgh/r"])
        .trim()
        .to_string();
    assert!(uri.starts_with("nbd://"), "{uri}");
    let data = pseudo_random(4 << 20, 77);
    let src = h.root.join("data.bin");
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri)).unwrap();
    let back = h.root.join("back.bin");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back)).unwrap();
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 8 << 20, "the LV's size");
    assert!(got[..data.len()] == data[..], "read back differs");
    vmd(&["lvchange", "-an", "vgh/r"]);
    drop(d);
    let holding: Vec<usize> = (0..4)
        .filter(|&i| contains(&h.files[i], &data[..1 << 20]))
        .collect();
    assert_eq!(
        holding.len(),
        3,
        "the data should be on three hosts: {holding:?}"
    );

    // One host goes away: its PV is reported missing, by host.
    let gone = (0..4).find(|i| !holding.contains(i)).unwrap_or(3);
    h.servers[gone] = None;
    let pvs = h.pvs();
    let unknown = pvs.get("[unknown]").expect("a missing PV row");
    assert_eq!(unknown.1, "missing", "{pvs:?}");
    assert_eq!(unknown.0, format!("h{gone}"), "{pvs:?}");

    // A host holding an image is down too when the LV is activated: it runs degraded on the
    // other two, says so, and serves the data; the monitor (policy warn) only reports it.
    let lost = holding[0];
    h.servers[lost] = None;
    let devfile = h.root.join("lvm-devices").display().to_string();
    let d = DaemonProc::start_with(
        &h.root.join("state"),
        &["--monitor-interval", "1", "--devicesfile", &devfile],
    );
    let o = h
        .cmd_in(
            &d.state,
            &["lvchange", "-ay", "vgh/r", "--nbd", "127.0.0.1:0"],
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}\n{}", d.log());
    assert!(
        err.contains("is on a missing PV: r runs without it"),
        "{err}"
    );
    let out = run_ok(&mut h.cmd_in(
        &d.state,
        &[
            "lvs",
            "--noheadings",
            "-o",
            "health_status,lv_dm_path",
            "vgh/r",
        ],
    ))
    .unwrap();
    let mut f = out.split_whitespace();
    assert_eq!(f.next(), Some("partial"), "{out}");
    let uri = f.next().expect("the LV's NBD URI").to_string();
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back)).unwrap();
    let got = std::fs::read(&back).unwrap();
    assert!(got[..data.len()] == data[..], "degraded read back differs");
    // The image on the lost host is reported failed, the others healthy.
    let rows = run_ok(&mut h.cmd_in(
        &d.state,
        &[
            "lvs",
            "-a",
            "--noheadings",
            "--separator",
            ";",
            "-o",
            "lv_name,health_status",
            "vgh",
        ],
    ))
    .unwrap();
    let failed: Vec<&str> = rows
        .lines()
        .filter(|l| l.contains("_rimage_") && l.trim_end().ends_with(";failed"))
        .collect();
    assert_eq!(failed.len(), 1, "{rows}");
    let t0 = std::time::Instant::now();
    while !d
        .log()
        .contains("raid_fault_policy warn: not replacing them")
    {
        assert!(
            t0.elapsed().as_secs() < 20,
            "no monitor report: {}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    run_ok(&mut h.cmd_in(&d.state, &["lvchange", "-an", "vgh/r"])).unwrap();
}

/// Whether `file` holds `needle` at some 1 MiB-aligned offset.
fn contains(file: &Path, needle: &[u8]) -> bool {
    let all = std::fs::read(file).unwrap();
    all.chunks(1 << 20).any(|c| c == needle)
}

/// The VastSky scenario on one machine: a three-way mirror over three of four NBD hosts, one
/// host dies under writes; the daemon's monitor (raid_fault_policy allocate) replaces the lost
/// image on the fourth host, rebuilds it, and the LV reads back what was written. The dead host
/// coming back is not used.
#[test]
fn the_monitor_re_mirrors_onto_a_spare_host_when_one_dies() {
    let mut h = Hosts::with_options(4, "?reconnect-delay=2&timeout=5&connect-timeout=2");
    let mut servers = std::mem::take(&mut h.servers);
    let uris = mirror_on_three_of_four(&h);
    let d = allocating_daemon(&h);
    let vmd = |args: &[&str]| -> String {
        run_ok(&mut h.cmd_in(&d.state, args)).unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
    };
    let (uri, first, src) = activate_and_fill(&h, &d, 4 << 20, 1);

    // Host 1 dies. A write after that fails its leg (after the URI's reconnect-delay); the
    // client sees no error.
    servers[1] = None;
    let mut all = first.clone();
    all.extend(pseudo_random(4 << 20, 2));
    std::fs::write(&src, &all).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));

    // The monitor replaces image 1 on host 3 and rebuilds it.
    let images = wait_re_mirrored(&h, &d, &uris[3]);
    assert!(
        images.iter().all(|s| !s.contains(&uris[1])),
        "the dead host still holds an image: {images:?}"
    );
    let log = d.log();
    for step in [
        "leg(s) [1] failed",
        "metadata committed",
        "rebuilding image 1",
        "replaced image(s) [1]",
    ] {
        assert!(log.contains(step), "the daemon log lacks '{step}': {log}");
    }
    let status = vmd(&["dev", "status", "vgm-r"]);
    assert!(status.contains(" AAA "), "{status}");
    // Everything written reads back, and the spare holds it.
    let back = h.root.join("back.bin");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back)).unwrap();
    assert!(std::fs::read(&back).unwrap() == all, "read back differs");
    assert!(
        contains(&h.files[3], &all[..1 << 20]),
        "the spare host lacks the data"
    );

    // The dead host returns: its stale PV is seen again but the LV does not use it.
    servers[1] = Some(PeerServer::nbdkit(
        h.ports[1],
        &["file", &h.files[1].display().to_string()],
    ));
    std::thread::sleep(std::time::Duration::from_secs(3));
    let images = image_devices(&h, "vgm", "r");
    assert!(images.iter().all(|s| !s.contains(&uris[1])), "{images:?}");
    let status = vmd(&["dev", "status", "vgm-r"]);
    assert!(status.contains(" AAA "), "{status}");
    vmd(&["lvchange", "-an", "vgm/r"]);
}

/// PVs on the four hosts of `h` (tagged `host:h0`..`h3`) in VG `vgm`, and a three-way mirror
/// `vgm/r` on hosts 0-2; host 3 is the spare. Returns the PVs' URIs.
fn mirror_on_three_of_four(h: &Hosts) -> Vec<String> {
    let uris: Vec<String> = h.uris.clone();
    let mut a = vec!["pvcreate"];
    a.extend(uris.iter().map(String::as_str));
    h.ok(&a);
    let mut a = vec!["vgcreate", "vgm"];
    a.extend(uris.iter().map(String::as_str));
    h.ok(&a);
    for (i, u) in uris.iter().enumerate() {
        h.ok(&["pvchange", "--addtag", &format!("host:h{i}"), u]);
    }
    h.ok(&[
        "lvcreate", "--type", "raid1", "-m", "2", "-L", "8M", "-n", "r", "vgm", &uris[0], &uris[1],
        &uris[2],
    ]);
    uris
}

/// The daemon on `h`'s state directory with `raid_fault_policy allocate` and its monitor
/// looking every second.
fn allocating_daemon(h: &Hosts) -> DaemonProc {
    let devfile = h.root.join("lvm-devices").display().to_string();
    DaemonProc::start_with(
        &h.root.join("state"),
        &[
            "--raid-fault-policy",
            "allocate",
            "--monitor-interval",
            "1",
            "--devicesfile",
            &devfile,
        ],
    )
}

/// Activates `vgm/r` on daemon `d`, exported over NBD, and writes `len` pseudo-random bytes
/// (`seed`) at its start. Returns its URI, the bytes and the file they came from.
fn activate_and_fill(
    h: &Hosts,
    d: &DaemonProc,
    len: usize,
    seed: u64,
) -> (String, Vec<u8>, PathBuf) {
    let vmd = |args: &[&str]| -> String {
        run_ok(&mut h.cmd_in(&d.state, args)).unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
    };
    vmd(&["lvchange", "-ay", "vgm/r", "--nbd", "127.0.0.1:0"]);
    let uri = vmd(&["lvs", "--noheadings", "-o", "lv_dm_path", "vgm/r"])
        .trim()
        .to_string();
    let data = pseudo_random(len, seed);
    let src = h.root.join(format!("data{seed}.bin"));
    std::fs::write(&src, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&src).arg(&uri))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    (uri, data, src)
}

/// After a re-mirror onto host 3: the array is whole (`AAA`), `data` reads back from the
/// start of `uri` and host 3's file holds it; then `vgm/r` is deactivated.
fn whole_again_on_the_spare(h: &Hosts, d: &DaemonProc, uri: &str, data: &[u8]) {
    let vmd = |args: &[&str]| -> String {
        run_ok(&mut h.cmd_in(&d.state, args)).unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
    };
    let status = vmd(&["dev", "status", "vgm-r"]);
    assert!(status.contains(" AAA "), "{status}");
    let back = h.root.join("whole.bin");
    run_ok(Command::new("nbdcopy").arg(uri).arg(&back)).unwrap();
    assert!(
        std::fs::read(&back).unwrap()[..data.len()] == data[..],
        "read back differs"
    );
    assert!(
        contains(&h.files[3], &data[..1 << 20]),
        "the spare host lacks the data"
    );
    vmd(&["lvchange", "-an", "vgm/r"]);
}

/// Waits (at most 90 s) until an image of `vgm/r` is on the PV `spare` and the LV is in sync;
/// returns the PVs of each image.
fn wait_re_mirrored(h: &Hosts, d: &DaemonProc, spare: &str) -> Vec<HashSet<String>> {
    let t0 = std::time::Instant::now();
    loop {
        let imgs = image_devices(h, "vgm", "r");
        let on_spare = imgs.iter().any(|s| s.contains(spare));
        let synced = run_ok(&mut h.cmd_in(
            &d.state,
            &["lvs", "--noheadings", "-o", "copy_percent", "vgm/r"],
        ))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
        if on_spare && synced.trim() == "100.00" {
            return imgs;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(90),
            "no re-mirror after 90 s: {imgs:?} sync {synced}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A daemon that restarts (here after a crash) while a host holding an image is down brings
/// the mirror back degraded, without that image, instead of failing the LV: the data is
/// served at once, and the monitor re-mirrors onto the spare host as if the host had died
/// under it.
#[test]
fn a_daemon_restarted_while_a_host_is_down_serves_the_mirror_degraded_and_re_mirrors() {
    let mut h = Hosts::with_options(4, "?reconnect-delay=2&timeout=5&connect-timeout=2");
    let mut servers = std::mem::take(&mut h.servers);
    let uris = mirror_on_three_of_four(&h);
    let mut d = allocating_daemon(&h);
    let vmd = |d: &DaemonProc, args: &[&str]| -> String {
        run_ok(&mut h.cmd_in(&d.state, args)).unwrap_or_else(|e| panic!("{e}\n{}", d.log()))
    };
    let (_, data, _) = activate_and_fill(&h, &d, 6 << 20, 9);

    // The daemon dies, and host 1 with it; the daemon comes back first.
    d.kill9();
    drop(d);
    servers[1] = None;
    let d = allocating_daemon(&h);
    let t0 = std::time::Instant::now();
    let uri = loop {
        let u = vmd(&d, &["lvs", "--noheadings", "-o", "lv_dm_path", "vgm/r"]);
        if u.trim().starts_with("nbd://") {
            break u.trim().to_string();
        }
        assert!(
            t0.elapsed().as_secs() < 30,
            "the LV did not come back: {u}\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    let back = h.root.join("back.bin");
    run_ok(Command::new("nbdcopy").arg(&uri).arg(&back))
        .unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    assert!(
        std::fs::read(&back).unwrap()[..data.len()] == data[..],
        "degraded read back differs"
    );
    let log = d.log();
    assert!(
        log.contains("vgm-r: restored degraded, without vgm-r_r"),
        "{log}"
    );

    // The monitor replaces image 1 on host 3 and rebuilds it; everything reads back.
    let images = wait_re_mirrored(&h, &d, &uris[3]);
    assert!(images.iter().all(|s| !s.contains(&uris[1])), "{images:?}");
    whole_again_on_the_spare(&h, &d, &uri, &data);
}

/// A mirror activated while a host holding an image is down runs without that image (`- -`);
/// the monitor still re-mirrors it onto the spare host: the new image's devices are created,
/// the array's table reloaded with them, and the rebuild copies what was written meanwhile.
#[test]
fn a_mirror_activated_while_a_host_is_down_is_re_mirrored_by_the_monitor() {
    let mut h = Hosts::with_options(4, "?reconnect-delay=2&timeout=5&connect-timeout=2");
    let mut servers = std::mem::take(&mut h.servers);
    let uris = mirror_on_three_of_four(&h);
    servers[2] = None;
    let d = allocating_daemon(&h);
    let (uri, data, _) = activate_and_fill(&h, &d, 6 << 20, 11);
    let images = wait_re_mirrored(&h, &d, &uris[3]);
    assert!(images.iter().all(|s| !s.contains(&uris[2])), "{images:?}");
    let log = d.log();
    assert!(
        log.contains("image 2 was missing from the running array"),
        "{log}"
    );
    whole_again_on_the_spare(&h, &d, &uri, &data);
}
