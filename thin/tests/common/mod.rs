#![allow(dead_code)]
//! Shared test helpers.

use std::sync::Arc;

use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef};
use thin::{Pool, PoolOptions};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

pub fn opts(block_sectors: u32) -> PoolOptions {
    PoolOptions {
        data_block_sectors: block_sectors,
        commit_interval: None,
        error_if_no_space: true,
        ..PoolOptions::default()
    }
}

pub fn mem(name: &str, size: u64) -> Arc<MemDevice> {
    Arc::new(MemDevice::new(name, Bytes(size)))
}

pub fn open(meta: DeviceRef, data: DeviceRef, o: PoolOptions) -> Arc<Pool> {
    iort::block_on(Pool::open(meta, data, o)).unwrap().unwrap()
}

pub fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    iort::block_on(f).unwrap()
}

/// A seeded splitmix64 step: reproducible pseudo-random numbers for workloads.
pub fn rng(s: &mut u64) -> u64 {
    *s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *s;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A copy of the first `size` bytes of `src`, named `name`.
pub fn copy_mem(name: &str, src: &MemDevice, size: u64) -> Arc<MemDevice> {
    let d = Arc::new(MemDevice::new(name, Bytes(size)));
    d.fill(0, &src.snapshot(0, size as usize));
    d
}
