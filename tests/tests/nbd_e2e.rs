//! End to end over NBD with clients nobody here wrote: a striped table over three sparse
//! files, served by `volmgr serve`, driven by qemu-io, nbdinfo, nbdcopy, fio and a real
//! filesystem (qemu-storage-daemon FUSE + loop + mkfs.ext4 + e2fsck).

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::*;

const CHUNK_SECTORS: u64 = 128; // 64 KiB chunks
const LEG_BYTES: u64 = 64 << 20;
const STRIPES: u64 = 3;

struct Fixture {
    dir: tempfile::TempDir,
    table: PathBuf,
    legs: Vec<PathBuf>,
}

/// Three sparse 64 MiB files and a 192 MiB striped table over them.
fn striped_fixture() -> Fixture {
    let dir = tempfile::Builder::new()
        .prefix("e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let legs: Vec<PathBuf> = (0..STRIPES)
        .map(|i| dir.path().join(format!("leg{i}.img")))
        .collect();
    for l in &legs {
        sparse_file(l, LEG_BYTES).unwrap();
    }
    let total = STRIPES * LEG_BYTES / 512;
    let mut line = format!("0 {total} striped {STRIPES} {CHUNK_SECTORS}");
    for l in &legs {
        line.push_str(&format!(" {} 0", l.display()));
    }
    let table = dir.path().join("striped.table");
    std::fs::write(
        &table,
        format!("# three-way stripe, 64 KiB chunks\n{line}\n"),
    )
    .unwrap();
    Fixture { dir, table, legs }
}

/// Where byte `off` of the striped volume lives: (leg, byte offset in leg). Computed here
/// independently of the implementation, from dm-stripe's definition.
fn dm_stripe_place(off: u64) -> (usize, u64) {
    let sector = off / 512;
    let chunk = sector / CHUNK_SECTORS;
    let leg = chunk % STRIPES;
    let leg_chunk = chunk / STRIPES;
    let leg_sector = leg_chunk * CHUNK_SECTORS + sector % CHUNK_SECTORS;
    (leg as usize, leg_sector * 512 + off % 512)
}

fn qemu_io(uri: &str, cmds: &[String]) -> std::process::Output {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(uri);
    run(&mut c).unwrap()
}

#[test]
fn qemu_io_patterns_across_chunk_boundaries_land_where_dm_puts_them() {
    require_tool("qemu-io");
    let fx = striped_fixture();
    let srv = Served::start(&fx.table, "vol", &[], fx.dir.path()).unwrap();
    // Writes that straddle chunk boundaries (64 KiB) and the stripe row (192 KiB).
    let writes: Vec<(u64, u64, u8)> = vec![
        (0, 4096, 0x11),
        (60 << 10, 12 << 10, 0x22),           // crosses chunk 0 -> 1
        ((192 << 10) - 512, 1024, 0x33),      // crosses the end of the first row
        ((1 << 20) + 512, 200 << 10, 0x44),   // spans several chunks, sector aligned
        ((100 << 20) - 4096, 64 << 10, 0x55), // deep in the volume
    ];
    let mut cmds: Vec<String> = writes
        .iter()
        .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}"))
        .collect();
    cmds.extend(
        writes
            .iter()
            .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}")),
    );
    cmds.push("flush".into());
    let out = qemu_io(&srv.uri(), &cmds);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "qemu-io failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !stdout.contains("Pattern verification failed") && !stdout.contains("error"),
        "{stdout}"
    );
    assert_eq!(grep_lines(&stdout, "read ").len(), writes.len(), "{stdout}");

    // Stop the server (flushes), then read the backing files directly.
    assert_eq!(srv.terminate().unwrap(), 0);
    let legs: Vec<Vec<u8>> = fx.legs.iter().map(|l| read_all(l).unwrap()).collect();
    for (o, l, p) in &writes {
        for b in (*o..o + l).step_by(512) {
            let (leg, at) = dm_stripe_place(b);
            assert_eq!(
                legs[leg][at as usize], *p,
                "volume byte {b} should be at leg {leg} byte {at}"
            );
        }
    }
    // And nothing else was written: the first sector after each write's last sector is zero
    // unless another write covers it.
    let covered = |b: u64| writes.iter().any(|(o, l, _)| b >= *o && b < o + l);
    for (o, l, _) in &writes {
        let b = o + l;
        if !covered(b) {
            let (leg, at) = dm_stripe_place(b);
            assert_eq!(legs[leg][at as usize], 0, "byte {b} must be untouched");
        }
    }
}

#[test]
fn nbdinfo_reports_size_and_flags() {
    require_tool("nbdinfo");
    let fx = striped_fixture();
    let srv = Served::start(&fx.table, "vol", &[], fx.dir.path()).unwrap();
    let out = run_ok(Command::new("nbdinfo").arg("--json").arg(srv.uri())).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let exp = &v["exports"][0];
    assert_eq!(
        exp["export-size"].as_u64(),
        Some(STRIPES * LEG_BYTES),
        "{out}"
    );
    assert_eq!(exp["export-name"].as_str(), Some("vol"), "{out}");
    assert_eq!(exp["can_flush"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_fua"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_trim"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_zero"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["can_multi_conn"].as_bool(), Some(true), "{out}");
    assert_eq!(exp["is_read_only"].as_bool(), Some(false), "{out}");
    assert_eq!(exp["block_size_minimum"].as_u64(), Some(512), "{out}");
    assert_eq!(srv.terminate().unwrap(), 0);
}

#[test]
fn nbdcopy_round_trips_a_random_image() {
    require_tool("nbdcopy");
    let fx = striped_fixture();
    let srv = Served::start(&fx.table, "vol", &[], fx.dir.path()).unwrap();
    let img_in = fx.dir.path().join("in.img");
    let img_out = fx.dir.path().join("out.img");
    let data = pseudo_random(64 << 20, 0x5eed);
    std::fs::write(&img_in, &data).unwrap();
    run_ok(Command::new("nbdcopy").arg(&img_in).arg(srv.uri())).unwrap();
    run_ok(Command::new("nbdcopy").arg(srv.uri()).arg(&img_out)).unwrap();
    let back = read_all(&img_out).unwrap();
    assert_eq!(back.len() as u64, STRIPES * LEG_BYTES);
    assert!(
        back[..data.len()] == data[..],
        "64 MiB image differs after the round trip"
    );
    assert!(
        back[data.len()..].iter().all(|&b| b == 0),
        "tail must stay zero"
    );
    assert_eq!(srv.terminate().unwrap(), 0);
}

#[test]
fn fio_verify_crc32c_with_several_jobs() {
    require_tool("fio");
    let fx = striped_fixture();
    let srv = Served::start(&fx.table, "vol", &[], fx.dir.path()).unwrap();
    let out = run_ok(
        Command::new("fio")
            .arg("--name=verify")
            .arg("--ioengine=nbd")
            .arg(format!("--uri={}", srv.uri()))
            .arg("--rw=randwrite")
            .arg("--bsrange=4k-64k")
            .arg("--iodepth=16")
            .arg("--numjobs=3")
            .arg("--size=48m")
            .arg("--offset_increment=60m")
            .arg("--verify=crc32c")
            .arg("--do_verify=1")
            .arg("--verify_fatal=1")
            .arg("--verify_state_save=0")
            .arg("--group_reporting")
            .arg("--output-format=json"),
    )
    .unwrap();
    let json_start = out.find('{').unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&out[json_start..]).unwrap();
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "{out}");
    assert!(
        job["write"]["io_bytes"].as_u64().unwrap_or(0) >= 3 * (48 << 20),
        "{out}"
    );
    assert!(
        job["read"]["io_bytes"].as_u64().unwrap_or(0) >= 3 * (48 << 20),
        "verify reads: {out}"
    );
    assert_eq!(srv.terminate().unwrap(), 0);
}

#[test]
fn ext4_mkfs_mount_fsck_remount_through_the_export() {
    require_root();
    require_tools(&[
        "qemu-storage-daemon",
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "mount",
    ]);
    let fx = striped_fixture();
    let srv = Served::start(&fx.table, "vol", &[], fx.dir.path()).unwrap();
    let mnt = fx.dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let sums;
    {
        let fl = FuseLoop::attach(srv.port, "vol", fx.dir.path()).unwrap();
        run_ok(Command::new("mkfs.ext4").args(["-F", "-q", &fl.loopdev])).unwrap();
        run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
        let fill = (|| -> anyhow::Result<()> {
            for d in 0..4 {
                let dd = mnt.join(format!("dir{d}"));
                std::fs::create_dir(&dd)?;
                for f in 0..8 {
                    std::fs::write(
                        dd.join(format!("f{f}")),
                        pseudo_random(((d * 8 + f) * 37_000 + 1) as usize, (d * 100 + f) as u64),
                    )?;
                }
            }
            Ok(())
        })();
        sums = tree_sums(&mnt, ".");
        let um = run_ok(Command::new("umount").arg(&mnt));
        fill.unwrap();
        um.unwrap();
        let fsck = run(Command::new("e2fsck").args(["-fn", &fl.loopdev])).unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck -fn not clean: {}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }
    // Restart the server: everything must come back from the files.
    assert_eq!(srv.terminate().unwrap(), 0);
    let srv = Served::start(&fx.table, "vol", &[], fx.dir.path()).unwrap();
    let fl = FuseLoop::attach(srv.port, "vol", fx.dir.path()).unwrap();
    run_ok(Command::new("mount").arg(&fl.loopdev).arg(&mnt)).unwrap();
    let again = tree_sums(&mnt, ".");
    run_ok(Command::new("umount").arg(&mnt)).unwrap();
    assert_eq!(sums.lines().count(), 32, "{sums}");
    assert_eq!(
        sums, again,
        "file checksums changed across remount and server restart"
    );
    drop(fl);
    assert_eq!(srv.terminate().unwrap(), 0);
}

#[test]
fn error_and_flakey_segments_fail_requests_and_the_server_keeps_serving() {
    require_tool("qemu-io");
    let dir = tempfile::Builder::new()
        .prefix("e2e-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let a = dir.path().join("a.img");
    sparse_file(&a, 8 << 20).unwrap();
    // [0, 4 MiB) linear, [4, 8) error, [8, 12) flakey always down with error_reads+error_writes
    let table = dir.path().join("faulty.table");
    std::fs::write(
        &table,
        format!(
            "0 8192 linear {a} 0\n8192 8192 error\n16384 8192 flakey {a} 8192 0 1 2 error_reads error_writes\n",
            a = a.display()
        ),
    )
    .unwrap();
    let mut srv = Served::start(&table, "f", &[], dir.path()).unwrap();
    let bad = qemu_io(&srv.uri(), &["read 5M 4k".into()]);
    let bad_out =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(
        bad_out.contains("Input/output error"),
        "error segment must fail reads: {bad_out}"
    );
    let bad = qemu_io(&srv.uri(), &["write -P 1 9M 4k".into()]);
    let bad_out =
        String::from_utf8_lossy(&bad.stdout).to_string() + &String::from_utf8_lossy(&bad.stderr);
    assert!(
        bad_out.contains("Input/output error"),
        "flakey segment must fail writes: {bad_out}"
    );
    let good = qemu_io(
        &srv.uri(),
        &["write -P 7 1M 64k".into(), "read -P 7 1M 64k".into()],
    );
    let good_out = String::from_utf8_lossy(&good.stdout);
    assert!(
        good.status.success() && !good_out.contains("error"),
        "{good_out}"
    );
    assert!(srv.alive(), "server must survive failing requests");
    assert_eq!(srv.terminate().unwrap(), 0);
}

#[test]
fn table_check_prints_normalized_table_or_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.table");
    std::fs::write(
        &good,
        "# comment\n0   2048 zero\n\n2048 2048    error  # trailing\n",
    )
    .unwrap();
    let out = run_ok(
        Command::new(volmgr_bin())
            .args(["table", "check"])
            .arg(&good),
    )
    .unwrap();
    assert_eq!(out, "0 2048 zero\n2048 2048 error\n");
    let bad = dir.path().join("bad.table");
    std::fs::write(&bad, "0 2048 zero\n4096 2048 zero\n").unwrap();
    let o = run(Command::new(volmgr_bin())
        .args(["table", "check"])
        .arg(&bad))
    .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 2"), "error must name the line: {err}");
}

#[test]
fn every_example_table_is_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) != Some("table") {
            continue;
        }
        let text = std::fs::read_to_string(&p)
            .unwrap()
            .replace("DIR", "/var/tmp/example");
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), text).unwrap();
        let o = run(Command::new(volmgr_bin())
            .args(["table", "check"])
            .arg(tmp.path()))
        .unwrap();
        assert!(
            o.status.success(),
            "{}: {}",
            p.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        n += 1;
    }
    assert!(n >= 4, "expected the example tables, found {n}");
}
