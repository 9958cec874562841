//! The volume daemon over its control socket, with devices exported over NBD (the host has no
//! ublk; the same verbs drive ublk devices in the VM tests).

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;

use e2e::DaemonProc as Daemon;

#[test]
fn daemon_devices_lifecycle_reload_stacking_and_restart() {
    require_root();
    require_tool("qemu-io");
    let dir = tempfile::Builder::new()
        .prefix("daemon-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let state = dir.path().join("state");
    let a = dir.path().join("a.img");
    sparse_file(&a, 64 << 20).unwrap();
    let t1 = dir.path().join("t1.table");
    std::fs::write(&t1, format!("0 65536 linear {} 0\n", a.display())).unwrap();

    let mut d = Daemon::start(&state);
    // A second daemon on the same state directory is refused.
    let second = run(Command::new(volmgr_bin())
        .args(["daemon", "--no-ublk", "--state-dir"])
        .arg(&state))
    .unwrap();
    assert!(!second.status.success());
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("already runs"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    // The control socket is root-only.
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(state.join("control.sock"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    let p1 = free_port();
    let uri = d.ok(&[
        "dev",
        "create",
        "base",
        "--table",
        t1.to_str().unwrap(),
        "--nbd",
        &format!("127.0.0.1:{p1}"),
    ]);
    let uri = uri.trim().to_string();
    assert_eq!(uri, format!("nbd://127.0.0.1:{p1}/base"));
    qemu_io(&uri, &["write -P 0x61 0 64k", "flush"]);

    // A stacked device: the second half of `base` through /dev/volmgr/base.
    let t2 = dir.path().join("t2.table");
    std::fs::write(&t2, "0 32768 linear /dev/volmgr/base 32768\n").unwrap();
    let p2 = free_port();
    let uri2 = d.ok(&[
        "dev",
        "create",
        "upper",
        "--table",
        t2.to_str().unwrap(),
        "--nbd",
        &format!("127.0.0.1:{p2}"),
    ]);
    qemu_io(uri2.trim(), &["write -P 0x62 0 4k"]);
    qemu_io(&uri, &["read -P 0x62 16M 4k", "read -P 0x61 0 64k"]);

    // Listing and the table.
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["base", "upper"]);
    assert_eq!(list[0]["size"].as_u64(), Some(32 << 20));
    assert!(list[0]["writes"].as_u64().unwrap() >= 2, "{list}");
    assert_eq!(
        d.ok(&["dev", "table", "upper"]),
        "0 32768 linear /dev/volmgr/base 32768\n"
    );
    let plain = d.ok(&["dev", "list"]);
    assert!(
        plain.contains("base") && plain.contains("32.00MiB"),
        "{plain}"
    );

    // base is used by upper: refused.
    let e = d.err(&["dev", "remove", "base"]);
    assert!(e.contains("used by upper"), "{e}");

    // Reload base larger (64 MiB); data stays.
    let t1b = dir.path().join("t1b.table");
    std::fs::write(&t1b, format!("0 131072 linear {} 0\n", a.display())).unwrap();
    d.ok(&["dev", "reload", "base", "--table", t1b.to_str().unwrap()]);
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap();
    assert_eq!(list[0]["size"].as_u64(), Some(64 << 20));
    qemu_io(
        &uri,
        &[
            "read -P 0x61 0 64k",
            "write -P 0x63 40M 4k",
            "read -P 0x63 40M 4k",
        ],
    );
    // Shrinking a live device is refused.
    let e = d.err(&["dev", "reload", "base", "--table", t1.to_str().unwrap()]);
    assert!(e.contains("smaller"), "{e}");

    // Suspend: I/O waits until resume.
    d.ok(&["dev", "suspend", "upper"]);
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap();
    assert_eq!(list[1]["state"].as_str(), Some("suspended"));
    let uri2c = uri2.trim().to_string();
    let reader = std::thread::spawn(move || {
        let t0 = Instant::now();
        qemu_io(&uri2c, &["read -P 0x62 0 4k"]);
        t0.elapsed()
    });
    std::thread::sleep(Duration::from_millis(700));
    d.ok(&["dev", "resume", "upper"]);
    let waited = reader.join().unwrap();
    assert!(
        waited >= Duration::from_millis(500),
        "read did not wait for resume: {waited:?}"
    );

    // Status and messages reach the target.
    let st = d.ok(&["dev", "status", "base"]);
    assert!(!st.is_empty());
    let e = d.err(&["dev", "message", "base", "bogus"]);
    assert!(e.contains("message"), "{e}");

    // SIGTERM: exit 0; restart restores both devices from devices.json.
    assert_eq!(d.terminate(), 0);
    let mut d = Daemon::start(&state);
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}\n{}", d.log());
    qemu_io(&uri, &["read -P 0x63 40M 4k"]);
    d.ok(&["dev", "remove", "upper"]);
    d.ok(&["dev", "remove", "base"]);
    let list: serde_json::Value = serde_json::from_str(&d.ok(&["dev", "list", "--json"])).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);
    assert!(!d.err(&["dev", "table", "base"]).is_empty());
    assert_eq!(d.terminate(), 0);
}

#[test]
fn dev_remove_refuses_while_a_client_is_connected_unless_forced() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("daemon-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let state = dir.path().join("state");
    let mut d = Daemon::start(&state);
    let t = dir.path().join("z.table");
    std::fs::write(&t, "0 2048 zero\n").unwrap();
    let p = free_port();
    d.ok(&[
        "dev",
        "create",
        "z",
        "--table",
        t.to_str().unwrap(),
        "--nbd",
        &format!("127.0.0.1:{p}"),
    ]);
    // Hold a connection open with a raw NBD handshake (the server counts it).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", p)).unwrap();
    let mut hello = [0u8; 18];
    std::io::Read::read_exact(&mut s, &mut hello).unwrap();
    std::io::Write::write_all(&mut s, &3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE|NO_ZEROES
    std::thread::sleep(Duration::from_millis(100));
    let e = d.err(&["dev", "remove", "z"]);
    assert!(e.contains("refusing") && e.contains("--force"), "{e}");
    d.ok(&["dev", "remove", "z", "--force"]);
    drop(s);
    assert_eq!(d.terminate(), 0);
}
