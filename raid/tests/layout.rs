//! Data placement equals md's: raid4/5 for every layout, raid10 near for several copy counts.
//! The expected placement is computed here independently, in the shape of md's
//! `raid5_compute_sector` and raid10's `__raid10_find_phys`.

mod common;
use common::*;
use tables::Sectors;

#[derive(Copy, Clone, Debug)]
enum Alg {
    La,
    Ra,
    Ls,
    Rs,
    ParityN,
}

/// md: returns (data disk, parity disk, stripe) of array chunk `chunk_number`.
fn md_raid5(alg: Alg, raid_disks: u64, chunk_number: u64) -> (u64, u64, u64) {
    let data_disks = raid_disks - 1;
    let stripe = chunk_number / data_disks;
    let mut dd_idx = chunk_number % data_disks;
    let pd_idx;
    match alg {
        Alg::La => {
            pd_idx = data_disks - stripe % raid_disks;
            if dd_idx >= pd_idx {
                dd_idx += 1;
            }
        }
        Alg::Ra => {
            pd_idx = stripe % raid_disks;
            if dd_idx >= pd_idx {
                dd_idx += 1;
            }
        }
        Alg::Ls => {
            pd_idx = data_disks - stripe % raid_disks;
            dd_idx = (pd_idx + 1 + dd_idx) % raid_disks;
        }
        Alg::Rs => {
            pd_idx = stripe % raid_disks;
            dd_idx = (pd_idx + 1 + dd_idx) % raid_disks;
        }
        Alg::ParityN => {
            pd_idx = data_disks;
        }
    }
    (dd_idx, pd_idx, stripe)
}

#[test]
fn raid5_layouts_match_md_placement() {
    let chunk = 4096u64;
    for (name, alg) in [
        ("raid5_la", Alg::La),
        ("raid5_ra", Alg::Ra),
        ("raid5_ls", Alg::Ls),
        ("raid5", Alg::Ls),
        ("raid5_rs", Alg::Rs),
        ("raid4", Alg::ParityN),
    ] {
        for n in [3u64, 4, 5] {
            let devs = Devs::default();
            let stripes = 7u64;
            let legs: Vec<_> = (0..n)
                .map(|i| mem(&format!("d{i}"), stripes * chunk))
                .collect();
            let mut line = format!("{name} 2 8 nosync {n}");
            for (i, l) in legs.iter().enumerate() {
                devs.add(&format!("d{i}"), l.clone());
                line.push_str(&format!(" - d{i}"));
            }
            let size = stripes * chunk * (n - 1);
            let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
            let data = pattern(n * 7 + alg as u64, size as usize);
            // Unaligned pieces, so partial-stripe paths are used too.
            let mut off = 0usize;
            let mut step = 1000usize;
            while off < data.len() {
                let l = step.min(data.len() - off);
                wr(&*dev, off as u64, &data[off..off + l]).unwrap();
                off += l;
                step = step * 3 % 20011 + 512;
            }
            for c in 0..size / chunk {
                let (dd, pd, stripe) = md_raid5(alg, n, c);
                let got = legs[dd as usize].snapshot(stripe * chunk, chunk as usize);
                assert_eq!(
                    got,
                    &data[(c * chunk) as usize..((c + 1) * chunk) as usize],
                    "{name} n={n}: chunk {c} not on leg {dd} stripe {stripe}"
                );
                let _ = pd;
            }
            for s in 0..stripes {
                let (_, pd, _) = md_raid5(alg, n, s * (n - 1));
                let mut x = vec![0u8; chunk as usize];
                for (i, l) in legs.iter().enumerate() {
                    if i as u64 != pd {
                        for (a, b) in x.iter_mut().zip(l.snapshot(s * chunk, chunk as usize)) {
                            *a ^= b;
                        }
                    }
                }
                assert_eq!(
                    x,
                    legs[pd as usize].snapshot(s * chunk, chunk as usize),
                    "{name} n={n}: parity of stripe {s} not on leg {pd} or wrong"
                );
            }
            same(&rd(&*dev, 0, size as usize).unwrap(), &data, "read back");
        }
    }
}

/// md raid10 near (far_copies 1): copies of array chunk `chunk` as (disk, device chunk).
fn md_raid10_near(raid_disks: u64, near: u64, chunk: u64) -> Vec<(u64, u64)> {
    let stripe = chunk * near;
    let mut dev = stripe % raid_disks;
    let mut s = stripe / raid_disks;
    let mut out = Vec::new();
    for _ in 0..near {
        out.push((dev, s));
        dev += 1;
        if dev == raid_disks {
            dev = 0;
            s += 1;
        }
    }
    out
}

#[test]
fn raid10_near_matches_md_placement() {
    let chunk = 4096u64;
    for (n, copies) in [(2u64, 2u64), (3, 2), (4, 2), (5, 3), (4, 4)] {
        let devs = Devs::default();
        let dev_chunks = 12u64;
        let legs: Vec<_> = (0..n)
            .map(|i| mem(&format!("d{i}"), dev_chunks * chunk))
            .collect();
        let mut line = format!("raid10 6 8 nosync raid10_copies {copies} raid10_format near {n}");
        for (i, l) in legs.iter().enumerate() {
            devs.add(&format!("d{i}"), l.clone());
            line.push_str(&format!(" - d{i}"));
        }
        let array_chunks = dev_chunks * n / copies;
        let size = array_chunks * chunk;
        let dev = build(&devs, false, false, Sectors(size / 512), &line).unwrap();
        let data = pattern(n * 100 + copies, size as usize);
        wr(&*dev, 0, &data).unwrap();
        for c in 0..array_chunks {
            for (d, s) in md_raid10_near(n, copies, c) {
                assert_eq!(
                    legs[d as usize].snapshot(s * chunk, chunk as usize),
                    &data[(c * chunk) as usize..((c + 1) * chunk) as usize],
                    "raid10 n={n} copies={copies}: chunk {c} copy on leg {d} row {s}"
                );
            }
        }
        same(&rd(&*dev, 0, size as usize).unwrap(), &data, "read back");
    }
}
