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
