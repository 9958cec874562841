//! Legs given as `- -` (dm-raid: "a drive failed or missing at creation time"): the array
//! runs degraded, serves correct data, and `rebuild <idx> <device>` brings the leg back.

mod common;
use common::*;

use raid::{LegState, RaidKind};
use tables::io::BlockDevice;
use tables::registry::TargetKind;
use tables::Sectors;

const MIB: u64 = 1 << 20;

/// Data legs d{i} (1 MiB), metadata m{i} (256 KiB: room for the parity log) and spares s{i}.
fn devs(n: usize) -> Devs {
    let devs = Devs::default();
    for i in 0..n {
        devs.add(&format!("d{i}"), mem(&format!("d{i}"), MIB));
        devs.add(&format!("m{i}"), mem(&format!("m{i}"), 256 << 10));
        devs.add(&format!("s{i}"), mem(&format!("s{i}"), MIB));
    }
    devs
}

/// `<head> <n> <legs>` with the legs in `gone` given as `- -`.
fn line(head: &str, n: usize, meta: bool, gone: &[usize]) -> String {
    let legs: Vec<String> = (0..n)
        .map(|i| match (gone.contains(&i), meta) {
            (true, _) => "- -".to_string(),
            (false, true) => format!("m{i} d{i}"),
            (false, false) => format!("- d{i}"),
        })
        .collect();
    format!("{head} {n} {}", legs.join(" "))
}

/// Overwrites `model` at `off` with `data` through the device.
fn put(dev: &dyn BlockDevice, model: &mut [u8], off: usize, data: &[u8]) {
    wr(dev, off as u64, data).unwrap();
    model[off..off + data.len()].copy_from_slice(data);
}

#[test]
fn raid5_with_a_missing_leg_serves_its_data_and_is_rebuilt_onto_a_new_device() {
    for meta in [true, false] {
        let devs = devs(3);
        let head = "raid5_ls 3 8 region_size 64";
        let size = 2 * MIB;
        let len = Sectors(size / 512);
        // An array written while whole...
        let dev = build(&devs, false, false, len, &line(head, 3, meta, &[])).unwrap();
        sync_all(&dev);
        let mut model = pattern(1, size as usize);
        wr(&*dev, 0, &model).unwrap();
        flush(&*dev).unwrap();
        drop(dev);
        // ...started again with leg 1 missing.
        let dev = build(&devs, false, false, len, &line(head, 3, meta, &[1])).unwrap();
        sync_all(&dev);
        assert_eq!(
            dev.leg_states(),
            vec![LegState::InSync, LegState::Failed, LegState::InSync]
        );
        assert!(
            dev.status().starts_with("raid5_ls 3 ADA "),
            "{}",
            dev.status()
        );
        assert!(dev.leg_errors()[1].as_ref().unwrap().contains("missing"));
        same(
            &rd(&*dev, 0, size as usize).unwrap(),
            &model,
            "degraded read",
        );
        // Writes: whole stripes, and pieces of chunks on the missing leg and the others.
        put(&*dev, &mut model, 0, &pattern(2, 3 * 8192));
        put(&*dev, &mut model, 4096 + 512, &pattern(3, 1000));
        put(&*dev, &mut model, 600_000, &pattern(4, 70_000));
        flush(&*dev).unwrap();
        if meta {
            assert!(dev.status().contains("ppl:active"), "{}", dev.status());
        }
        same(
            &rd(&*dev, 0, size as usize).unwrap(),
            &model,
            "after writes",
        );
        // `rebuild 1` alone has no device to rebuild onto.
        let e = msg(&*dev, "rebuild 1").unwrap_err();
        assert!(e.msg.contains("rebuild 1 <device>"), "{e}");
        msg(&*dev, "rebuild 1 s1").unwrap();
        sync_all(&dev);
        assert_eq!(dev.leg_states(), vec![LegState::InSync; 3]);
        assert!(
            dev.status().starts_with("raid5_ls 3 AAA "),
            "{}",
            dev.status()
        );
        assert_eq!(check(&dev), 0, "parity after the rebuild");
        // The rebuilt leg holds its data: lose another one and read everything back.
        iort::block_on(dev.fail_leg(0)).unwrap().unwrap();
        same(
            &rd(&*dev, 0, size as usize).unwrap(),
            &model,
            "leg 0 failed",
        );
        msg(&*dev, "rebuild 0").unwrap();
        sync_all(&dev);
        assert_eq!(dev.leg_states(), vec![LegState::InSync; 3]);
        drop(dev);
        if meta {
            // The old device back in leg 1's place is stale, and s1 has no superblock to
            // vouch for it: the survivors' superblocks keep leg 1 marked, so it is rebuilt,
            // never read.
            let dev = build(&devs, false, false, len, &line(head, 3, meta, &[])).unwrap();
            let l1 = dev.leg_states()[1];
            assert_eq!(l1, LegState::Recovering, "{:?}", dev.leg_errors());
            same(&rd(&*dev, 0, size as usize).unwrap(), &model, "stale leg 1");
            sync_all(&dev);
            assert_eq!(dev.leg_states(), vec![LegState::InSync; 3]);
            same(&rd(&*dev, 0, size as usize).unwrap(), &model, "rebuilt d1");
        }
    }
}

#[test]
fn raid1_started_new_with_a_missing_leg_serves_writes_and_rebuilds() {
    for meta in [true, false] {
        let devs = devs(3);
        let len = Sectors(MIB / 512);
        let dev = build(
            &devs,
            false,
            false,
            len,
            &line("raid1 3 0 region_size 64", 3, meta, &[2]),
        )
        .unwrap();
        sync_all(&dev);
        assert!(dev.status().starts_with("raid1 3 AAD "), "{}", dev.status());
        let mut model = vec![0u8; MIB as usize];
        put(&*dev, &mut model, 0, &pattern(5, 300_000));
        put(&*dev, &mut model, 700_001, &pattern(6, 5_000));
        flush(&*dev).unwrap();
        same(&rd(&*dev, 0, MIB as usize).unwrap(), &model, "degraded");
        msg(&*dev, "rebuild 2 s2").unwrap();
        sync_all(&dev);
        assert!(dev.status().starts_with("raid1 3 AAA "), "{}", dev.status());
        assert_eq!(check(&dev), 0);
        // Only the rebuilt leg left: it has everything.
        iort::block_on(dev.fail_leg(0)).unwrap().unwrap();
        iort::block_on(dev.fail_leg(1)).unwrap().unwrap();
        same(
            &rd(&*dev, 0, MIB as usize).unwrap(),
            &model,
            "rebuilt leg alone",
        );
    }
}

#[test]
fn missing_legs_print_back_and_too_many_are_refused() {
    let k = RaidKind::raid();
    let l = "raid5_ls 1 8 3 m0 d0 - - m2 d2";
    assert_eq!(k.normalize(&args(l)).join(" "), l);
    k.validate(Sectors(2048), &args(l)).unwrap();
    let refused: &[(&str, &str)] = &[
        ("raid5 1 8 3 - - - - m2 d2", "too many"),
        ("raid1 1 0 2 - - - -", "too many"),
        ("raid10 1 8 4 - - - - m2 d2 m3 d3", "too many"),
        ("raid5 3 8 rebuild 1 3 m0 d0 - - m2 d2", "rebuild 1"),
        ("raid5 3 8 rebuild 0 3 m0 d0 - - m2 d2", "cannot rebuild"),
        ("raid5 1 8 3 m0 d0 m1 - m2 d2", "'- -'"),
        ("raid5 1 8 3 m0 d0 - - - d2", "metadata device"),
    ];
    let devs = devs(4);
    for (l, why) in refused {
        let e = k.validate(Sectors(2048), &args(l)).unwrap_err();
        assert!(e.to_string().contains(why), "'{l}': {e}");
        let Err(e) = build(&devs, false, false, Sectors(2048), l) else {
            panic!("'{l}' built");
        };
        assert!(e.contains(why), "'{l}': {e}");
    }
    // raid10 tolerates missing legs that do not share a chunk.
    let l = "raid10 1 8 4 - - m1 d1 - - m3 d3";
    k.validate(Sectors(2048), &args(l)).unwrap();
    let dev = build(&devs, false, false, Sectors(2048), l).unwrap();
    sync_all(&dev);
    assert!(
        dev.status().starts_with("raid10 4 DADA "),
        "{}",
        dev.status()
    );
}

/// What the daemon does at start when a leg's device could not be brought back: the line
/// with that leg as `- -`, while the level keeps a copy of everything; refused otherwise.
#[test]
fn without_devices_turns_gone_legs_into_missing_ones_while_the_level_allows() {
    let raid = RaidKind::raid();
    let words = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
    let args = words("raid1 3 0 rebuild 1 3 m0 d0 m1 d1 m2 d2");
    let devs = raid.device_args(&args);
    let at = |name: &str| devs.iter().copied().find(|&i| args[i] == name).unwrap();
    // The data device of leg 1 is gone: the whole leg goes, and its rebuild with it.
    let out = raid.without_devices(&args, &[at("d1")]).unwrap();
    assert_eq!(out.join(" "), "raid1 1 0 3 m0 d0 - - m2 d2");
    // Two of three legs gone still leaves a copy, but not one to rebuild leg 1 from.
    assert!(raid.without_devices(&args, &[at("m0"), at("d2")]).is_none());
    let plain = words("raid1 1 0 3 m0 d0 m1 d1 m2 d2");
    let pd = raid.device_args(&plain);
    let gone: Vec<usize> = pd
        .into_iter()
        .filter(|&i| plain[i] == "m0" || plain[i] == "d2")
        .collect();
    let out = raid.without_devices(&plain, &gone).unwrap();
    assert_eq!(out.join(" "), "raid1 1 0 3 - - m1 d1 - -");
    // Every leg gone: nothing to run on.
    assert!(raid
        .without_devices(&args, &[at("d0"), at("d1"), at("d2")])
        .is_none());
    // raid5 survives one missing leg, not two.
    let args = words("raid5_ls 3 128 region_size 1024 3 m0 d0 m1 d1 m2 d2");
    let devs = raid.device_args(&args);
    let at = |name: &str| devs.iter().copied().find(|&i| args[i] == name).unwrap();
    let out = raid.without_devices(&args, &[at("m2")]).unwrap();
    assert_eq!(out[out.len() - 2..].join(" "), "- -");
    assert!(raid.without_devices(&args, &[at("d0"), at("d1")]).is_none());
    // The mirror target's legs are `<dev> <offset>`.
    let mirror = RaidKind::mirror();
    let args = words("core 1 1024 2 a 0 b 0");
    let devs = mirror.device_args(&args);
    assert_eq!(
        mirror.without_devices(&args, &[devs[1]]).unwrap().join(" "),
        "core 1 1024 2 a 0 - 0"
    );
}
