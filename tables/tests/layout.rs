//! On-disk layout of `striped` over `linear` over MemDevices, checked against placement
//! computed here independently, per sector, from dm-stripe's formula.

mod common;

use common::Devices;
use proptest::prelude::*;
use tables::io::read_blocking;
use tables::{BlockDevice, Bytes, WriteFlags};

const S: u64 = 512;

/// A sector's content: its number and a salt, so misplaced sectors are recognisable.
fn sector_bytes(sector: u64, salt: u8) -> Vec<u8> {
    let mut v = vec![salt; S as usize];
    v[..8].copy_from_slice(&sector.to_le_bytes());
    v[8] = salt ^ 0xFF;
    v
}

fn check_layout(
    legs: usize,
    chunk: u64,
    rows: u64,
    lin_off: &[u64],
    stripe_off: &[u64],
    write_sizes: &[u64],
) -> Result<(), TestCaseError> {
    let per_leg = chunk * rows;
    let len = per_leg * legs as u64;
    let mut d = Devices::default();
    let mut mems = Vec::new();
    let mut args = String::new();
    for i in 0..legs {
        let mem_sectors = lin_off[i] + stripe_off[i] + per_leg + 5;
        mems.push(d.mem(&format!("m{i}"), mem_sectors * S));
        let lin_len = stripe_off[i] + per_leg + 2;
        let lin = d.build(&format!("0 {lin_len} linear m{i} {}", lin_off[i]));
        d.add(&format!("l{i}"), lin);
        args.push_str(&format!(" l{i} {}", stripe_off[i]));
    }
    let dev = d.build(&format!("0 {len} striped {legs} {chunk}{args}"));
    let salt = 0x42;
    // Write the whole device in requests of the given sizes (in sectors), crossing chunks.
    let mut data = Vec::with_capacity((len * S) as usize);
    for s in 0..len {
        data.extend(sector_bytes(s, salt));
    }
    iort::block_on(async {
        let mut pos = 0u64;
        let mut k = 0;
        while pos < len {
            let n = write_sizes[k % write_sizes.len()].min(len - pos);
            k += 1;
            let b = &data[(pos * S) as usize..((pos + n) * S) as usize];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { dev.write(Bytes(pos * S), b, WriteFlags::default()) }
                .await
                .unwrap();
            pos += n;
        }
    })
    .unwrap();
    // Independent placement: sector s -> leg, sector on the leg's linear, sector on the mem.
    let mut expected: Vec<Vec<Option<u64>>> = mems
        .iter()
        .map(|m| vec![None; (m.size().0 / S) as usize])
        .collect();
    for s in 0..len {
        let chunk_no = s / chunk;
        let leg = (chunk_no % legs as u64) as usize;
        let chunk_on_dev = chunk_no / legs as u64;
        let on_leg = stripe_off[leg] + chunk_on_dev * chunk + s % chunk;
        let on_mem = lin_off[leg] + on_leg;
        prop_assert!(
            expected[leg][on_mem as usize].is_none(),
            "two sectors map to one place"
        );
        expected[leg][on_mem as usize] = Some(s);
    }
    for (i, m) in mems.iter().enumerate() {
        for (ms, want) in expected[i].iter().enumerate() {
            let got = m.snapshot(ms as u64 * S, S as usize);
            match want {
                Some(s) => prop_assert_eq!(
                    &got,
                    &sector_bytes(*s, salt),
                    "mem m{} sector {} should hold striped sector {}",
                    i,
                    ms,
                    s
                ),
                None => prop_assert!(
                    got.iter().all(|&b| b == 0),
                    "mem m{} sector {} should be untouched",
                    i,
                    ms
                ),
            }
        }
    }
    // And reading back through the stack returns the data.
    let mut back = vec![0u8; (len * S) as usize];
    read_blocking(&*dev, Bytes(0), &mut back).unwrap();
    prop_assert!(back == data);
    Ok(())
}

#[test]
fn layout_fixed_example() {
    // 3 legs, 8-sector chunks: sector 8 is chunk 1 -> leg 1, its chunk 0.
    check_layout(3, 8, 4, &[5, 0, 17], &[0, 3, 1], &[1, 7, 9, 24, 3]).unwrap();
}

#[test]
fn layout_single_leg_and_large_chunk() {
    check_layout(1, 64, 3, &[2], &[9], &[100, 1]).unwrap();
    check_layout(4, 128, 2, &[0, 1, 2, 3], &[8, 0, 8, 0], &[300, 33]).unwrap();
}

proptest! {
    #![proptest_config(common::config(64))]

    #[test]
    fn layout_matches_dm_stripe_formula(
        legs in 1usize..6,
        chunk_shift in 3u32..7,
        rows in 1u64..5,
        offs in proptest::collection::vec((0u64..40, 0u64..40), 6),
        sizes in proptest::collection::vec(1u64..100, 1..6),
    ) {
        let lin: Vec<u64> = offs.iter().map(|o| o.0).collect();
        let st: Vec<u64> = offs.iter().map(|o| o.1).collect();
        check_layout(legs, 1 << chunk_shift, rows, &lin, &st, &sizes)?;
    }
}
