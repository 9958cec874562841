//! A multipath table over two NBD paths to the same export (two nbdkit processes serving one
//! file), served by the daemon and exported over NBD: a writer keeps going while one server
//! is killed (no client error, the path shows F) and comes back (the checker reinstates it).

use std::path::Path;
use std::time::Duration;

use e2e::mpath::{path_state, wait_path, PatternWriter};
use e2e::*;

#[test]
fn a_writer_survives_a_path_dying_and_the_checker_brings_it_back() {
    require_tools(&["nbdkit", "qemu-io"]);
    let dir = tempfile::Builder::new()
        .prefix("multipath-e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let p = dir.path();
    let file = p.join("lun.img");
    sparse_file(&file, 64 << 20).unwrap();
    let file_arg = format!("file={}", file.display());
    let (pa, pb) = (free_port(), free_port());
    let mut sa = PeerServer::nbdkit(pa, &["file", &file_arg]);
    let _sb = PeerServer::nbdkit(pb, &["file", &file_arg]);
    let opts = "?timeout=2&reconnect-delay=1&connect-timeout=1";
    let (ua, ub) = (
        format!("nbd://127.0.0.1:{pa}/{opts}"),
        format!("nbd://127.0.0.1:{pb}/{opts}"),
    );
    let d = DaemonProc::start(&p.join("state"));
    let t = p.join("mp.table");
    std::fs::write(
        &t,
        format!(
            "0 131072 multipath 2 checker_interval_ms 200 0 1 1 round-robin 0 2 1 {ua} 16 {ub} 16\n"
        ),
    )
    .unwrap();
    let port = d.create_nbd("mp", Path::new(&t));
    let table = d.ok(&["dev", "table", "mp"]);
    assert!(
        table.contains(&format!(
            "multipath 2 checker_interval_ms 200 0 1 1 round-robin 0 2 1 {ua} 16 {ub} 16"
        )),
        "{table}"
    );
    let uri = format!("nbd://127.0.0.1:{port}/mp");

    // The writer: 1 MiB writes of a pattern per slot, each read back through the
    // multipath; any error fails the thread.
    let writer = PatternWriter::start(&uri, 32);

    std::thread::sleep(Duration::from_secs(1));
    sa.kill();
    let fails = wait_path(&d, "mp", &ua, "F", 30);
    assert_eq!(fails, "1");
    assert_eq!(path_state(&d, "mp", &ub).0, "A");
    // Writes keep going over the other path.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!writer.is_finished(), "the writer stopped");
    assert_eq!(
        path_state(&d, "mp", &ua).0,
        "F",
        "a dead path was reinstated"
    );

    // The server comes back on the same port: the extent reconnects, the checker reinstates.
    let _sa2 = PeerServer::nbdkit(pa, &["file", &file_arg]);
    wait_path(&d, "mp", &ua, "A", 30);
    std::thread::sleep(Duration::from_secs(1));
    let (last, n) = writer
        .finish()
        .unwrap_or_else(|| panic!("the writer saw an error; daemon log:\n{}", d.log()));
    assert!(n > 5, "only {n} writes");
    // What the client last wrote is in the file, read back both through us and directly.
    let bytes = read_all(&file).unwrap();
    for (slot, &pat) in last.iter().enumerate() {
        let at = slot << 20;
        assert!(
            bytes[at..at + (1 << 20)].iter().all(|&b| b == pat),
            "slot {slot} does not hold pattern {pat}"
        );
        if pat != 0 && slot % 8 == 0 {
            qemu_io(&uri, &[&format!("read -P {pat} {at} 1M")]);
        }
    }
    let st = d.ok(&["dev", "status", "mp"]);
    assert!(st.contains(&format!("{ua} A 1 {ub} A 0")), "{st}");
}
