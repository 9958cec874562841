//! TLS on our NBD exports (`--tls on|require`), against real clients: libnbd's nbdinfo,
//! qemu-img, and our own client extent; a plain client refused by a TLS-only export; a key
//! others can read refused; a warning for an export on a public address without TLS.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::*;
use extents::net::NetUri;

/// `volmgr serve` of a 64 MiB file table on 127.0.0.1:`port` with `extra` options.
fn serve(dir: &Path, port: u16, addr: &str, extra: &[&str]) -> (Child, std::path::PathBuf) {
    let img = dir.join("disk.img");
    sparse_file(&img, 64 << 20).unwrap();
    let t = dir.join("t.table");
    std::fs::write(&t, format!("0 131072 linear {} 0\n", img.display())).unwrap();
    let log = dir.join(format!("serve-{port}.log"));
    let child = Command::new(volmgr_bin())
        .args([
            "serve",
            t.to_str().unwrap(),
            "--nbd",
            &format!("{addr}:{port}"),
        ])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "serve never listened: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, log)
}

fn out(c: &mut Command) -> (bool, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr),
    )
}

#[test]
fn an_export_that_requires_tls_serves_nbdinfo_qemu_and_our_client_and_refuses_plain() {
    require_tools(&["nbdinfo", "qemu-img", "qemu-io", "openssl"]);
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_test_certs(&pki, "volmgr-test-ca");
    let port = free_port();
    let certs = pki.to_str().unwrap();
    let (mut srv, _log) = serve(
        dir.path(),
        port,
        "127.0.0.1",
        &["--tls", "require", "--tls-certificates", certs],
    );

    // libnbd with TLS.
    let (ok, text) = out(Command::new("nbdinfo").arg(format!(
        "nbds://127.0.0.1:{port}/volume?tls-certificates={certs}"
    )));
    assert!(ok && text.contains("67108864"), "{text}");
    // A plain client is refused.
    let (ok, text) = out(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{port}/volume")));
    assert!(!ok, "a plain client got in: {text}");
    // qemu with x509 credentials writes and reads through TLS.
    let image = format!("driver=nbd,host=127.0.0.1,port={port},export=volume,tls-creds=tls0");
    let obj = format!("tls-creds-x509,id=tls0,dir={certs},endpoint=client");
    let (ok, text) = out(Command::new("timeout").args([
        "60",
        "qemu-io",
        "--object",
        &obj,
        "--image-opts",
        &image,
        "-c",
        "write -P 0x5a 0 4M",
        "-c",
        "read -P 0x5a 0 4M",
    ]));
    assert!(ok && !text.contains("failed"), "{text}");
    // Our own client extent, TLS on both sides.
    let NetUri::Nbd(u) = extents::net::NetUri::parse(&format!(
        "nbds://127.0.0.1:{port}/volume?tls-certificates={certs}"
    ))
    .unwrap() else {
        panic!()
    };
    let d = extents::net::NbdExtent::open(u).unwrap();
    let mut b = vec![0u8; 1 << 20];
    tables::io::read_blocking(&d, tables::Bytes(0), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0x5a));
    let big: Vec<u8> = (0..(16u32 << 20)).map(|i| (i % 253) as u8).collect();
    tables::io::write_blocking(&d, tables::Bytes(8 << 20), &big, Default::default()).unwrap();
    let mut back = vec![0u8; big.len()];
    tables::io::read_blocking(&d, tables::Bytes(8 << 20), &mut back).unwrap();
    assert!(
        back == big,
        "16 MiB through TLS both ways came back different"
    );
    drop(d);
    let _ = srv.kill();
    let _ = srv.wait();
}

#[test]
fn tls_on_takes_both_and_bad_keys_and_public_plain_exports_are_called_out() {
    require_tools(&["nbdinfo", "openssl"]);
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    std::fs::create_dir(&pki).unwrap();
    make_test_certs(&pki, "volmgr-test-ca");
    let certs = pki.to_str().unwrap();
    let port = free_port();
    let (mut srv, _) = serve(
        dir.path(),
        port,
        "127.0.0.1",
        &["--tls", "on", "--tls-certificates", certs],
    );
    for uri in [
        format!("nbd://127.0.0.1:{port}/volume"),
        format!("nbds://127.0.0.1:{port}/volume?tls-certificates={certs}"),
    ] {
        let (ok, text) = out(Command::new("nbdinfo").args(["--size", &uri]));
        assert!(ok && text.trim() == "67108864", "{uri}: {text}");
    }
    let _ = srv.kill();
    let _ = srv.wait();

    // A server key others can read: refused, naming the file.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        pki.join("server-key.pem"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (ok, text) = out(Command::new(volmgr_bin()).args([
        "serve",
        "/dev/null",
        "--nbd",
        "127.0.0.1:0",
        "--tls",
        "require",
        "--tls-certificates",
        certs,
    ]));
    assert!(
        !ok && text.contains("server-key.pem") && text.contains("chmod 600"),
        "{text}"
    );
    assert!(!text.contains("BEGIN"), "key material in an error: {text}");

    // No TLS on an address other hosts can reach: a warning.
    let port = free_port();
    let (mut srv, log) = serve(dir.path(), port, "0.0.0.0", &[]);
    std::thread::sleep(Duration::from_millis(200));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("without TLS"), "{text}");
    let _ = srv.kill();
    let _ = srv.wait();
}
