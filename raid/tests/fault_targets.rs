//! Fault injection with the real device-mapper style targets as legs: a `flakey` leg that
//! fails every write, a `delay` leg, an `error` leg, built from table text exactly as an
//! administrator would write them.

use std::collections::HashMap;
use std::sync::Arc;

use tables::io::{DeviceRef, WriteFlags};
use tables::mem::MemDevice;
use tables::registry::Registry;
use tables::table::Table;
use tables::Bytes;

const LEG: u64 = 4 << 20; // bytes per leg
const META: u64 = 1 << 20;

fn registry() -> Registry {
    let mut r = tables::targets::builtin_registry();
    raid::register(&mut r);
    r
}

/// Builds `text` with a resolver that knows `devs` by name.
fn build(reg: &Registry, devs: &HashMap<String, DeviceRef>, text: &str) -> DeviceRef {
    let t = Table::parse(text, reg).unwrap_or_else(|e| panic!("{text}: {e}"));
    let resolver = |name: &str| -> Result<DeviceRef, String> {
        devs.get(name)
            .cloned()
            .ok_or_else(|| format!("unknown {name}"))
    };
    t.build(reg, &resolver)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn mem(name: &str, size: u64) -> DeviceRef {
    Arc::new(MemDevice::new(name, Bytes(size)))
}

/// Legs: d0 plain; d1 a flakey table that is always down and fails writes (reads work);
/// d2 a delay table (2 ms reads, 3 ms writes). Metadata on plain devices.
fn legs(reg: &Registry) -> HashMap<String, DeviceRef> {
    let mut devs = HashMap::new();
    for i in 0..3 {
        devs.insert(format!("m{i}"), mem(&format!("m{i}"), META));
        devs.insert(format!("raw{i}"), mem(&format!("raw{i}"), LEG));
    }
    let s = LEG / 512;
    let d0 = build(reg, &devs, &format!("0 {s} linear raw0 0"));
    let d1 = build(
        reg,
        &devs,
        &format!("0 {s} flakey raw1 0 0 1 1 error_writes"),
    );
    let d2 = build(reg, &devs, &format!("0 {s} delay raw2 0 2 raw2 0 3"));
    devs.insert("d0".into(), d0);
    devs.insert("d1".into(), d1);
    devs.insert("d2".into(), d2);
    devs
}

fn pattern(i: u64, len: usize) -> Vec<u8> {
    (0..len).map(|k| (i as usize * 31 + k * 7) as u8).collect()
}

#[test]
fn raid5_with_a_flakey_leg_keeps_every_write_and_marks_the_leg_failed() {
    let reg = registry();
    let devs = legs(&reg);
    // 2 data legs' worth of space.
    let sectors = 2 * LEG / 512;
    let raid = build(
        &reg,
        &devs,
        &format!("0 {sectors} raid raid5_ls 3 128 region_size 256 3 m0 d0 m1 d1 m2 d2"),
    );
    let mut model = vec![0u8; (2 * LEG) as usize];
    iort::block_on(async {
        // Writes crossing chunk (64 KiB) and stripe boundaries; none may fail the client.
        for i in 0..64u64 {
            let off = (i * 97 * 4096 + (i % 3) * 512) % (2 * LEG - 200_000);
            let len = 4096 + (i as usize % 5) * 30_000;
            let data = pattern(i, len);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { raid.write(Bytes(off), &data, WriteFlags::default()) }
                .await
                .unwrap_or_else(|e| panic!("write {i} failed with a flakey leg: {e}"));
            model[off as usize..off as usize + len].copy_from_slice(&data);
        }
        raid.flush().await.unwrap();
        let mut back = vec![0u8; model.len()];
        for (k, chunk) in back.chunks_mut(256 << 10).enumerate() {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { raid.read(Bytes((k as u64) << 18), chunk) }
                .await
                .unwrap();
        }
        assert!(
            back == model,
            "data read back differs from what was written"
        );
    })
    .unwrap();
    let st = raid.status();
    // `<start> <len> raid <type> <#legs> <health> ...` (the table prefixes its segment)
    let health = st.split_whitespace().nth(5).unwrap_or("");
    assert_eq!(
        health.chars().nth(1),
        Some('D'),
        "leg 1 must be failed: {st}"
    );
}

#[test]
fn raid5_with_two_error_legs_returns_eio_never_garbage() {
    let reg = registry();
    let mut devs = legs(&reg);
    let s = LEG / 512;
    devs.insert("e1".into(), build(&reg, &devs, &format!("0 {s} error")));
    devs.insert("e2".into(), build(&reg, &devs, &format!("0 {s} error")));
    let sectors = 2 * LEG / 512;
    // Without metadata devices (all "-") so assembly does not need to read the legs.
    let raid = build(
        &reg,
        &devs,
        &format!("0 {sectors} raid raid5_ls 2 128 nosync 3 - d0 - e1 - e2"),
    );
    iort::block_on(async {
        let mut buf = vec![0xAAu8; 256 << 10];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let r = unsafe { raid.read(Bytes(0), &mut buf) }.await;
        let e = r.expect_err("two failed legs of three cannot serve data");
        assert_eq!(e.errno, libc::EIO, "{e}");
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let w = unsafe { raid.write(Bytes(0), &buf, WriteFlags::default()) }.await;
        assert!(w.is_err(), "writes must fail too");
    })
    .unwrap();
}
