//! Interoperability with real NBD clients: nbdinfo/nbdcopy (libnbd-bin), qemu-io
//! (qemu-utils) and fio's nbd engine. A missing tool fails the test, naming the package.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use common::*;
use nbd::{Server, ServerHandle};
use tables::mem::MemDevice;
use tables::units::Bytes;

const MIB: u64 = 1 << 20;

/// Path of a required tool; panics with the Debian package to install if it is missing.
fn need(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(tool);
        if p.is_file() {
            return p;
        }
    }
    panic!("required tool '{tool}' is not installed (apt-get install {package})");
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn serve(dev: &Arc<MemDevice>) -> (ServerHandle, String) {
    let h = Server::builder()
        .export("disk", "test disk", as_dev(dev))
        .threads(2)
        .build()
        .unwrap()
        .serve_tcp("127.0.0.1:0")
        .unwrap();
    let uri = format!("nbd://{}/disk", h.local_addr().unwrap());
    (h, uri)
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    let nbdinfo = need("nbdinfo", "libnbd-bin");
    let dev = mem(96 * MIB);
    let (h, uri) = serve(&dev);
    let out = run(Command::new(&nbdinfo).arg("--json").arg(&uri));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["protocol"], "newstyle-fixed");
    assert_eq!(j["structured"], true, "structured replies negotiated");
    let e = &j["exports"][0];
    assert_eq!(e["export-name"], "disk");
    assert_eq!(e["description"], "test disk");
    assert_eq!(e["export-size"], 96 * MIB);
    assert_eq!(e["is_read_only"], false);
    for flag in [
        "can_flush",
        "can_fua",
        "can_multi_conn",
        "can_trim",
        "can_zero",
        "can_fast_zero",
    ] {
        assert_eq!(e[flag], true, "{flag} in {e}");
    }
    assert_eq!(e["block_size_minimum"], 512);
    assert_eq!(e["block_size_preferred"], 4096);
    assert_eq!(e["block_size_maximum"], 32 * MIB);

    // --list over a Unix socket, with a read-only export.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let hu = Server::builder()
        .export("a", "first", as_dev(&dev))
        .export_read_only("b", "second", as_dev(&dev))
        .build()
        .unwrap()
        .serve_unix(&sock)
        .unwrap();
    let out = run(Command::new(&nbdinfo)
        .arg("--json")
        .arg("--list")
        .arg(format!("nbd+unix:///?socket={}", sock.display())));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<_> = j["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].clone())
        .collect();
    assert_eq!(names, vec!["a", "b"]);
    assert_eq!(j["exports"][1]["is_read_only"], true);
    assert_eq!(j["exports"][1]["description"], "second");
    hu.shutdown().unwrap();
    h.shutdown().unwrap();
}

#[test]
fn qemu_io_writes_and_verifies_patterns() {
    let qemu_io = need("qemu-io", "qemu-utils");
    let dev = mem(64 * MIB);
    let (h, uri) = serve(&dev);
    let out = run(Command::new(&qemu_io).args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0xab 0 1M",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -z 1M 64k",
        "-c",
        "read -P 0 1M 64k",
        "-c",
        "aio_write -P 0x5c 2M 256k",
        "-c",
        "aio_write -P 0x5d 3M 256k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x5c 2M 256k",
        "-c",
        "read -P 0x5d 3M 256k",
        "-c",
        "discard 3M 256k",
        "-c",
        "write -f 5M 4k",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("Pattern verification failed"), "{stdout}");
    assert!(!stdout.contains("failed"), "{stdout}");
    assert!(
        stdout.contains("wrote 1048576/1048576 bytes at offset 0"),
        "{stdout}"
    );
    assert!(
        stdout.contains("read 1048576/1048576 bytes at offset 0"),
        "{stdout}"
    );
    assert!(dev.snapshot(0, MIB as usize).iter().all(|&b| b == 0xab));
    assert!(dev.snapshot(2 * MIB, 256 << 10).iter().all(|&b| b == 0x5c));
    // A wrong pattern is detected (the check above can fail).
    let bad = Command::new(&qemu_io)
        .args(["-f", "raw", &uri, "-c", "read -P 0xcd 0 4k"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&bad.stdout).contains("Pattern verification failed"));
    // Reading past the end is refused by the client itself or by us; either way an error.
    let past = Command::new(&qemu_io)
        .args(["-f", "raw", &uri, "-c", "read 64M 4k"])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&past.stdout).to_string() + &String::from_utf8_lossy(&past.stderr);
    assert!(
        text.contains("error") || text.contains("Input/output") || text.contains("Invalid"),
        "{text}"
    );
    h.shutdown().unwrap();
}

#[test]
fn nbdcopy_round_trips_64_mib() {
    let nbdcopy = need("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("in.img");
    let dst = dir.path().join("out.img");
    let data = pattern(77, 64 << 20);
    std::fs::write(&src, &data).unwrap();
    let dev = mem(64 * MIB);
    let (h, uri) = serve(&dev);
    run(Command::new(&nbdcopy).arg("--flush").arg(&src).arg(&uri));
    assert!(
        dev.snapshot(0, data.len()) == data,
        "device differs from the source"
    );
    run(Command::new(&nbdcopy).arg(&uri).arg(&dst));
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "copied-out file differs");
    assert!(h.total_connections() >= 2);
    h.shutdown().unwrap();
}

#[test]
fn fio_nbd_engine_verifies_pipelined_io() {
    let fio = need("fio", "fio");
    let dev = Arc::new(MemDevice::new("fio", Bytes(32 * MIB)));
    let (h, uri) = serve(&dev);
    let out = run(Command::new(&fio).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bsrange=4k-128k",
        "--iodepth=16",
        "--size=32M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("verify: (groupid=0"), "{stdout}");
    assert!(
        !stdout.contains("verify failed") && !stdout.contains("bad magic"),
        "{stdout}"
    );
    assert!(stdout.contains("err= 0"), "{stdout}");
    h.shutdown().unwrap();
}
