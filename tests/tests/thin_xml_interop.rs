//! Thin-pool metadata moves between kernel dm-thin's format and ours through
//! thin-provisioning-tools' XML (Debian's 0.9.0 `thin_dump`, `thin_restore`, `thin_check`;
//! `scripts/setup.sh` installs them, and these tests fail naming them when they are missing):
//!
//! - ours → kernel: a pool built through the `thin` library on files, `volmgr pool dump
//!   --format xml`, `thin_restore` into kernel-format metadata, `thin_check` clean, and
//!   `thin_dump` of it gives our mappings back (the very same text, in fact);
//! - kernel → ours: `thin_dump` of kernel-format metadata (made by `thin_restore` from a file
//!   with ranges, singles, a shared block and times), `volmgr pool restore`, `pool check`
//!   clean, `pool dump` the same, and a thin device built from a table over the restored
//!   metadata reads data block `d` of the data file at `d * block size`, as dm-thin does.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use e2e::*;
use tables::registry::Resolver;
use tables::table::Table;
use tables::{BlockDevice, Bytes, DeviceRef, WriteFlags};
use thin::tools::Dump;
use thin::{Pool, PoolOptions, ThinId};

/// 64 KiB data blocks, as dm-thin's default.
const BLOCK_SECTORS: u32 = 128;
const BLOCK: u64 = BLOCK_SECTORS as u64 * 512;
const MIB: u64 = 1 << 20;

fn require_thin_tools() {
    require_tools(&["thin_dump", "thin_restore", "thin_check"]);
}

fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("thin-xml-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// Runs `volmgr ARGS`; panics with its output unless it exits 0.
fn volmgr(args: &[&str]) -> String {
    run_ok(Command::new(volmgr_bin()).args(args)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs a thin-provisioning-tools command; panics with its output unless it exits 0.
fn tool(name: &str, args: &[&str]) -> String {
    run_ok(Command::new(name).args(args)).unwrap_or_else(|e| panic!("{e:#}"))
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A zeroed file of `size` bytes, opened as a device.
fn file_dev(path: &Path, size: u64) -> DeviceRef {
    sparse_file(path, size).unwrap();
    let e = extents::FileExtent::open(path, extents::OpenOptions::default())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Arc::new(e)
}

fn parse(text: &str, what: &str) -> Dump {
    thin::xml::from_xml(text).unwrap_or_else(|e| panic!("{what}: {e}\n{text}"))
}

/// A pool of ours on files with thin devices 1, 2, 7 (empty) and 9 (a snapshot of 1 that
/// then diverged), mappings in runs and single blocks, transaction id 6.
fn build_our_pool(meta_path: &Path, data_path: &Path) {
    let meta = file_dev(meta_path, 8 * MIB);
    let data = file_dev(data_path, 1024 * BLOCK);
    let opts = PoolOptions {
        data_block_sectors: BLOCK_SECTORS,
        commit_interval: None,
        ..PoolOptions::default()
    };
    iort::block_on(async move {
        let pool: Arc<Pool> = Pool::open(meta, data, opts).await.unwrap();
        for id in [1, 2, 7] {
            pool.create_thin(ThinId(id)).unwrap();
        }
        let size = Bytes(4096 * BLOCK);
        let t1 = pool.thin(ThinId(1), size, None).unwrap();
        let t2 = pool.thin(ThinId(2), size, None).unwrap();
        let w = |b: u64| vec![(b % 251) as u8 + 1; BLOCK as usize];
        // Device 1: a run of 10, then blocks far apart.
        for b in (0..10).chain([50, 100, 3000]) {
            // SAFETY: awaited here; the buffer outlives the future.
            unsafe { t1.write(Bytes(b * BLOCK), &w(b), WriteFlags::default()) }
                .await
                .unwrap();
        }
        // Device 2 interleaved with device 1, so neither gets one long data run.
        for b in [3, 4, 1000, 4095] {
            // SAFETY: awaited here; the buffer outlives the future.
            unsafe { t2.write(Bytes(b * BLOCK), &w(b), WriteFlags::default()) }
                .await
                .unwrap();
            // SAFETY: awaited here; the buffer outlives the future.
            unsafe { t1.write(Bytes((200 + b % 7) * BLOCK), &w(b), WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.create_snap(ThinId(9), ThinId(1)).await.unwrap();
        // Copy-on-write: device 1 gets new blocks for 5 and 6, the snapshot keeps the old.
        // SAFETY: awaited here; the buffer outlives the future.
        unsafe { t1.write(Bytes(5 * BLOCK), &w(77), WriteFlags::default()) }
            .await
            .unwrap();
        // SAFETY: awaited here; the buffer outlives the future.
        unsafe { t1.write(Bytes(6 * BLOCK), &w(78), WriteFlags::default()) }
            .await
            .unwrap();
        pool.set_transaction_id(0, 6).unwrap();
        pool.commit().await.unwrap();
        drop((t1, t2));
        pool.close().await.unwrap();
    })
    .unwrap();
}

#[test]
fn our_pool_to_kernel_format() {
    require_thin_tools();
    let dir = tmpdir();
    let p = |n: &str| dir.path().join(n);
    build_our_pool(&p("meta.img"), &p("data.img"));
    let meta = file_dev_ro(&p("meta.img"));
    let ours = iort::block_on(thin::tools::dump(&meta)).unwrap().unwrap();
    drop(meta);
    assert_eq!(ours.devices.len(), 4);
    assert_eq!(ours.transaction_id, 6);
    assert!(
        ours.devices
            .iter()
            .any(|d| d.mappings.iter().any(|r| r.len > 1))
            && ours
                .devices
                .iter()
                .any(|d| d.mappings.iter().any(|r| r.len == 1)),
        "want ranges and singles: {ours:?}"
    );

    volmgr(&[
        "pool",
        "dump",
        "--format",
        "xml",
        path_str(&p("meta.img")),
        "-o",
        path_str(&p("ours.xml")),
    ]);
    let xml = std::fs::read_to_string(p("ours.xml")).unwrap();
    assert_eq!(parse(&xml, "pool dump --format xml"), ours);

    // Into kernel format, checked and dumped by the kernel's tools.
    sparse_file(&p("kmeta.img"), 8 * MIB).unwrap();
    tool(
        "thin_restore",
        &[
            "-i",
            path_str(&p("ours.xml")),
            "-o",
            path_str(&p("kmeta.img")),
        ],
    );
    tool("thin_check", &[path_str(&p("kmeta.img"))]);
    let back = tool("thin_dump", &[path_str(&p("kmeta.img"))]);
    assert_eq!(parse(&back, "thin_dump"), ours, "thin_dump:\n{back}");
    // thin_dump writes exactly what we wrote.
    assert_eq!(back, xml);
}

/// Our metadata file opened read only (the pool is closed).
fn file_dev_ro(path: &Path) -> DeviceRef {
    let opts = extents::OpenOptions {
        read_only: true,
        ..extents::OpenOptions::default()
    };
    Arc::new(extents::FileExtent::open(path, opts).unwrap())
}

/// Kernel-format metadata as a user would have it: ranges, singles, a data block shared by
/// two devices (a snapshot), times and device transaction ids, an empty device, and a run
/// long enough for a mapping tree of several levels in both formats.
const KERNEL_XML: &str = r#"<superblock uuid="" time="3" transaction="12" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
  <device dev_id="1" mapped_blocks="23" transaction="4" creation_time="0" snap_time="2">
    <range_mapping origin_begin="0" data_begin="100" length="16" time="0"/>
    <single_mapping origin_block="40" data_block="3" time="1"/>
    <single_mapping origin_block="41" data_block="200" time="1"/>
    <single_mapping origin_block="42" data_block="201" time="1"/>
    <range_mapping origin_begin="1000" data_begin="10" length="4" time="2"/>
  </device>
  <device dev_id="3" mapped_blocks="9" transaction="7" creation_time="2" snap_time="2">
    <range_mapping origin_begin="0" data_begin="100" length="8" time="0"/>
    <single_mapping origin_block="9" data_block="255" time="3"/>
  </device>
  <device dev_id="4" mapped_blocks="0" transaction="9" creation_time="3" snap_time="3">
  </device>
  <device dev_id="5" mapped_blocks="700" transaction="9" creation_time="3" snap_time="3">
    <range_mapping origin_begin="5000" data_begin="300" length="700" time="3"/>
  </device>
</superblock>
"#;

/// The bytes data block `b` of the data file holds: its number, then a pattern of it.
fn block_pattern(b: u64) -> Vec<u8> {
    let mut v = vec![(b as u8) ^ 0x5a; BLOCK as usize];
    v[..8].copy_from_slice(&b.to_le_bytes());
    v[BLOCK as usize - 8..].copy_from_slice(&(!b).to_le_bytes());
    v
}

/// Builds one table line with the product's registry; `pool` names an already built pool.
fn build_line(text: &str, pool: Option<&DeviceRef>) -> DeviceRef {
    let reg = volmgr::registry();
    let files = extents::FileResolver::default();
    let pool = pool.cloned();
    let resolver = move |dev: &str| -> Result<DeviceRef, String> {
        match (&pool, dev) {
            (Some(p), "pool") => Ok(p.clone()),
            _ => files.open(dev),
        }
    };
    let table = Table::parse(text, &reg).unwrap_or_else(|e| panic!("{text}: {e}"));
    // The pool's open does its I/O on a ring of its own thread.
    std::thread::scope(|s| {
        s.spawn(|| table.build(&reg, &resolver as &dyn Resolver))
            .join()
            .unwrap()
    })
    .unwrap_or_else(|e| panic!("{text}: {e}"))
}

#[test]
fn kernel_format_to_our_pool() {
    require_thin_tools();
    let dir = tmpdir();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| path_str(&p(n)).to_string();
    // Kernel-format metadata, and thin_dump's XML of it.
    std::fs::write(p("hand.xml"), KERNEL_XML).unwrap();
    sparse_file(&p("kmeta.img"), 8 * MIB).unwrap();
    tool(
        "thin_restore",
        &["-i", &s("hand.xml"), "-o", &s("kmeta.img")],
    );
    tool("thin_check", &[&s("kmeta.img")]);
    let kernel_xml = tool("thin_dump", &[&s("kmeta.img")]);
    assert!(
        kernel_xml.contains("snap_time=\"2\"") && kernel_xml.contains("time=\"3\""),
        "thin_dump keeps the times we drop:\n{kernel_xml}"
    );
    std::fs::write(p("kernel.xml"), &kernel_xml).unwrap();
    let want = parse(&kernel_xml, "thin_dump");
    assert_eq!(want.transaction_id, 12);
    assert_eq!(want.devices.len(), 4);

    // Into our format; the format is told by the content.
    sparse_file(&p("meta.img"), 8 * MIB).unwrap();
    let out = volmgr(&[
        "pool",
        "restore",
        "--input",
        &s("kernel.xml"),
        &s("meta.img"),
        "--yes",
    ]);
    assert!(out.contains("restored 4 device(s)"), "{out}");
    let check = volmgr(&["pool", "check", &s("meta.img")]);
    assert!(
        check.contains("transaction 12") && check.contains("4 thin device(s), 732 mapped block(s)"),
        "{check}"
    );
    let ours = volmgr(&["pool", "dump", "--format", "xml", &s("meta.img")]);
    assert_eq!(parse(&ours, "pool dump --format xml"), want);
    let json = volmgr(&["pool", "dump", "--json", &s("meta.img")]);
    let json: Dump = serde_json::from_str(&json).unwrap();
    assert_eq!(json, want);

    // The data device as dm-thin left it: block b at b * 64 KiB.
    let nr = want.nr_data_blocks;
    let mut data = Vec::with_capacity((nr * BLOCK) as usize);
    for b in 0..nr {
        data.extend_from_slice(&block_pattern(b));
    }
    std::fs::write(p("data.img"), &data).unwrap();
    let dev_sectors = 8192 * BLOCK_SECTORS as u64;
    let pool = build_line(
        &format!(
            "0 {} thin-pool {} {} {BLOCK_SECTORS} 0\n",
            nr * BLOCK_SECTORS as u64,
            s("meta.img"),
            s("data.img")
        ),
        None,
    );
    for d in &want.devices {
        let thin = build_line(
            &format!("0 {dev_sectors} thin pool {}\n", d.id.0),
            Some(&pool),
        );
        let mapped: Vec<(u64, u64)> = d
            .mappings
            .iter()
            .flat_map(|r| (0..r.len).map(move |i| (r.vblock.0 + i, r.dblock.0 + i)))
            .collect();
        assert_eq!(mapped.len() as u64, d.mapped_blocks);
        // Every mapped block, and the unmapped neighbours of each run.
        let mut blocks: Vec<(u64, Option<u64>)> =
            mapped.iter().map(|&(v, b)| (v, Some(b))).collect();
        for r in &d.mappings {
            for v in [r.vblock.0.checked_sub(1), Some(r.vblock.0 + r.len)]
                .into_iter()
                .flatten()
            {
                if !mapped.iter().any(|&(m, _)| m == v) {
                    blocks.push((v, None));
                }
            }
        }
        blocks.push((8191, None));
        iort::block_on(async {
            let mut buf = vec![0u8; BLOCK as usize];
            for &(v, b) in &blocks {
                // SAFETY: awaited here; the buffer outlives the future.
                unsafe { thin.read(Bytes(v * BLOCK), &mut buf) }.await.unwrap();
                let want = b.map_or_else(|| vec![0u8; BLOCK as usize], block_pattern);
                assert!(
                    buf == want,
                    "thin {}: virtual block {v} should read data block {b:?}, reads one starting {:?}",
                    d.id.0,
                    &buf[..8]
                );
            }
        })
        .unwrap();
    }
    drop(pool);

    // The data device was not written by any of this.
    assert!(std::fs::read(p("data.img")).unwrap() == data);
}

/// Hostile or wrong XML through the CLI: refused naming the file, line and attribute, the
/// metadata device untouched; `--format` overrides the guess.
#[test]
fn restore_refuses_bad_xml_without_touching_the_metadata() {
    let dir = tmpdir();
    let p = |n: &str| dir.path().join(n);
    let s = |n: &str| path_str(&p(n)).to_string();
    // Metadata holding something, to see that it stays.
    std::fs::write(p("good.xml"), KERNEL_XML).unwrap();
    sparse_file(&p("meta.img"), 8 * MIB).unwrap();
    volmgr(&[
        "pool",
        "restore",
        "-i",
        &s("good.xml"),
        &s("meta.img"),
        "--yes",
    ]);
    let before = std::fs::read(p("meta.img")).unwrap();
    let bad = KERNEL_XML.replace(
        r#"<single_mapping origin_block="9" data_block="255" time="3"/>"#,
        r#"<single_mapping origin_block="9" data_block="1024" time="3"/>"#,
    );
    let overlap = KERNEL_XML.replace(
        r#"origin_block="41" data_block="200""#,
        r#"origin_block="15" data_block="200""#,
    );
    let cases: [(&str, String, Option<&str>, &[&str]); 4] = [
        (
            "beyond.xml",
            bad,
            None,
            &["line 11", "data_block=\"1024\"", "1024 data blocks"],
        ),
        (
            "overlap.xml",
            overlap,
            None,
            &["line 5", "device 1: virtual block 15", "line 3"],
        ),
        (
            "json-as-xml.json",
            "{\"version\":1}".into(),
            Some("xml"),
            &["line 1, column 1: unexpected text"],
        ),
        (
            "xml-as-json.xml",
            KERNEL_XML.into(),
            Some("json"),
            &["not a JSON pool dump"],
        ),
    ];
    for (name, text, format, expect) in cases {
        std::fs::write(p(name), text).unwrap();
        let mut c = Command::new(volmgr_bin());
        c.args(["pool", "restore", "-i", &s(name), &s("meta.img"), "--yes"]);
        if let Some(f) = format {
            c.args(["--format", f]);
        }
        let o = run(&mut c).unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: restored");
        assert!(
            err.contains(name),
            "{name}: error does not name the file: {err}"
        );
        assert!(
            expect.iter().all(|e| err.contains(e)),
            "{name}: error should say {expect:?}: {err}"
        );
        assert!(
            std::fs::read(p("meta.img")).unwrap() == before,
            "{name}: the metadata device was written"
        );
    }
}
