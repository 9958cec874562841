//! XOR parity throughput beside memcpy of the same bytes, in the same run.
//!
//! `cargo bench -p raid --bench xor`. For k data chunks, "xor" computes the parity chunk from
//! all k (reads k chunks, writes one); "memcpy" copies the same k chunks of source bytes into
//! one destination chunk (same bytes read). GB/s counts source bytes per second, so the ratio
//! compares like with like. Bursts of the two alternate so load from other processes hits
//! both alike; best and median ratios are printed. Two tables: 64 KiB chunks (cache-resident)
//! and 8 MiB chunks (memory bandwidth).

use std::hint::black_box;
use std::time::{Duration, Instant};

const CHUNK: usize = 64 << 10;

/// GB/s of one short timed burst.
fn burst(f: &mut impl FnMut(), bytes_per_iter: usize) -> f64 {
    let start = Instant::now();
    let mut iters = 0u64;
    while start.elapsed() < Duration::from_millis(25) {
        for _ in 0..16 {
            f();
        }
        iters += 16;
    }
    iters as f64 * bytes_per_iter as f64 / start.elapsed().as_secs_f64() / 1e9
}

/// Alternates bursts of `a` and `b` (so machine noise hits both alike) and returns the best
/// and median GB/s of each.
fn compare(
    mut a: impl FnMut(),
    mut b: impl FnMut(),
    bytes_per_iter: usize,
) -> ((f64, f64), (f64, f64)) {
    for _ in 0..50 {
        a();
        b();
    }
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for _ in 0..21 {
        ra.push(burst(&mut a, bytes_per_iter));
        rb.push(burst(&mut b, bytes_per_iter));
    }
    let stats = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        (v[v.len() - 1], v[v.len() / 2])
    };
    (stats(ra), stats(rb))
}

fn run(chunk: usize) {
    println!(
        "{:>3} {:>14} {:>14} {:>12} {:>14}",
        "k", "xor GB/s best", "memcpy best", "ratio best", "ratio median"
    );
    for k in 4..=8usize {
        let srcs: Vec<Vec<u8>> = (0..k)
            .map(|i| (0..chunk).map(|j| (i * 131 + j * 7) as u8).collect())
            .collect();
        let mut dst = vec![0u8; chunk];
        let refs: Vec<&[u8]> = srcs.iter().map(|s| s.as_slice()).collect();
        let mut dst2 = vec![0u8; chunk];
        let ((xb, xm), (cb, cm)) = compare(
            || raid::xor::xor_many(black_box(&mut dst), black_box(&refs)),
            || {
                for s in &refs {
                    black_box(&mut dst2).copy_from_slice(black_box(s));
                }
            },
            k * chunk,
        );
        println!(
            "{k:>3} {xb:>14.2} {cb:>14.2} {:>12.2} {:>14.2}",
            xb / cb,
            xm / cm
        );
    }
}

fn main() {
    println!("k data chunks of 64 KiB (cache-resident, the figure the issue asks for):");
    run(CHUNK);
    println!("k data chunks of 8 MiB (out of cache: memory bandwidth):");
    run(8 << 20);
}
