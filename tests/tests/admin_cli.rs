//! What administrators expect around the CLI and the daemon: systemd readiness only after every
//! device is back, a unit file systemd accepts, shell completions and manual pages generated
//! from the command definition, and progress for long background work.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::*;

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("admin-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

#[test]
fn the_daemon_tells_systemd_it_is_ready_only_after_every_device_is_back() {
    require_root();
    let dir = tempdir();
    let state = dir.path().join("state");
    let d = DaemonProc::start(&state);
    for i in 0..16 {
        let img = dir.path().join(format!("{i}.img"));
        sparse_file(&img, 1 << 20).unwrap();
        let t = dir.path().join(format!("{i}.table"));
        std::fs::write(&t, format!("0 2048 linear {} 0\n", img.display())).unwrap();
        d.create_nbd(&format!("v{i:02}"), &t);
    }
    drop(d);
    std::fs::remove_file(dir.path().join("3.img")).unwrap();

    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let log = std::fs::File::create(dir.path().join("d.log")).unwrap();
    let mut child = Command::new(volmgr_bin())
        .args(["daemon", "--no-ublk"])
        .env("VOLMGR_STATE_DIR", &state)
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 512];
    let n = sock.recv(&mut buf).expect("no READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.starts_with("READY=1\n"), "{msg}");
    assert!(msg.contains("STATUS=15 device(s) up, 1 failed"), "{msg}");
    // Ready means restored: nothing is pending any more.
    let out = run_ok(
        Command::new(volmgr_bin())
            .args(["dev", "list", "--json"])
            .env("VOLMGR_STATE_DIR", &state),
    )
    .unwrap();
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let states: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["state"].as_str().unwrap())
        .collect();
    assert_eq!(
        states.iter().filter(|s| **s == "active").count(),
        15,
        "{states:?}"
    );
    assert_eq!(
        states.iter().filter(|s| **s == "failed").count(),
        1,
        "{states:?}"
    );
    // SIGTERM: STOPPING=1, then the exit (non-zero: a device is still failed).
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let n = sock.recv(&mut buf).expect("no STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(1));
}

#[test]
fn the_systemd_unit_passes_systemd_analyze() {
    require_tool("systemd-analyze");
    let dir = tempdir();
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/systemd/volmgr.service"),
    )
    .unwrap();
    assert!(unit.contains("Type=notify"));
    // The shipped unit names the installed path; verify it against this build's binary.
    let p = dir.path().join("volmgr.service");
    std::fs::write(
        &p,
        unit.replace("/usr/local/sbin/volmgr", &volmgr_bin().to_string_lossy()),
    )
    .unwrap();
    let o = run(Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&p))
    .unwrap();
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn completions_and_manual_pages_come_from_the_command_definition() {
    let dir = tempdir();
    let bash = run_ok(Command::new(volmgr_bin()).args(["completions", "bash"])).unwrap();
    for word in ["daemon", "retry", "--nbd-memory", "--table"] {
        assert!(bash.contains(word), "bash completion lacks {word}");
    }
    let script = dir.path().join("volmgr.bash");
    std::fs::write(&script, &bash).unwrap();
    run_ok(Command::new("bash").arg("-n").arg(&script)).unwrap();
    for sh in ["zsh", "fish"] {
        assert!(
            !run_ok(Command::new(volmgr_bin()).args(["completions", sh]))
                .unwrap()
                .is_empty()
        );
    }
    let out = run_ok(Command::new(volmgr_bin()).arg("manpages").arg(dir.path())).unwrap();
    assert!(out.contains("manual pages"), "{out}");
    for page in [
        "volmgr.8",
        "volmgr-dev-create.8",
        "volmgr-dev-wait.8",
        "volmgr-daemon.8",
    ] {
        let text = std::fs::read_to_string(dir.path().join(page)).unwrap();
        assert!(text.contains(".TH"), "{page}");
    }
    let create = std::fs::read_to_string(dir.path().join("volmgr-dev-create.8")).unwrap();
    assert!(create.contains("nbd\\-memory"), "{create}");
}

#[test]
fn dev_wait_follows_a_rebuild_to_the_end() {
    require_root();
    let dir = tempdir();
    let d = DaemonProc::start(&dir.path().join("state"));
    let mut legs = Vec::new();
    for i in 0..2 {
        let (m, x) = (
            dir.path().join(format!("m{i}.img")),
            dir.path().join(format!("d{i}.img")),
        );
        sparse_file(&m, 4 << 20).unwrap();
        sparse_file(&x, 64 << 20).unwrap();
        legs.push(format!("{} {}", m.display(), x.display()));
    }
    let t = dir.path().join("r1.table");
    std::fs::write(
        &t,
        format!(
            "0 131072 raid raid1 3 0 max_recovery_rate 20000 2 {}\n",
            legs.join(" ")
        ),
    )
    .unwrap();
    let port = d.create_nbd("r1", &t);
    qemu_io(&format!("nbd://127.0.0.1:{port}/r1"), &["write -P 7 0 8M"]);
    d.ok(&["dev", "message", "r1", "fail", "1"]);
    let spare = dir.path().join("spare.img");
    sparse_file(&spare, 64 << 20).unwrap();
    d.ok(&[
        "dev",
        "message",
        "r1",
        "rebuild",
        "1",
        &spare.to_string_lossy(),
    ]);
    let t0 = Instant::now();
    let o = d.vm(&["dev", "wait", "r1", "--timeout", "120"]);
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains(" AA ") && out.contains(" idle "), "{out}");
    // Not a terminal here: progress comes as plain lines while it runs.
    if t0.elapsed() > Duration::from_secs(6) {
        assert!(err.contains("recover"), "{err}");
    }
    // A timeout that is too short fails with a message that says what still runs.
    d.ok(&["dev", "message", "r1", "resync"]);
    let o = d.vm(&["dev", "wait", "r1", "--timeout", "0"]);
    if !o.status.success() {
        assert!(String::from_utf8_lossy(&o.stderr).contains("still running"));
    }
}
