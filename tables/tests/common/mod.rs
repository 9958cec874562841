//! Shared test helpers: a resolver over named devices and a flat reference model.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use tables::mem::MemDevice;
use tables::registry::Registry;
use tables::table::Table;
use tables::targets::builtin_registry;
use tables::{BlockDevice, Bytes, DeviceRef, WriteFlags};

/// Named devices a table may refer to (MemDevices or tables built earlier).
#[derive(Default, Clone)]
pub struct Devices {
    pub map: HashMap<String, DeviceRef>,
    pub mems: HashMap<String, Arc<MemDevice>>,
}

impl Devices {
    pub fn mem(&mut self, name: &str, size: u64) -> Arc<MemDevice> {
        let m = Arc::new(MemDevice::new(name, Bytes(size)));
        self.map.insert(name.to_string(), m.clone());
        self.mems.insert(name.to_string(), m.clone());
        m
    }
    pub fn add(&mut self, name: &str, d: DeviceRef) {
        self.map.insert(name.to_string(), d);
    }
    pub fn resolver(&self) -> impl Fn(&str) -> Result<DeviceRef, String> + '_ {
        move |n: &str| {
            self.map
                .get(n)
                .cloned()
                .ok_or_else(|| format!("no device named '{n}'"))
        }
    }
    /// Parses and builds a table against these devices.
    pub fn build(&self, text: &str) -> DeviceRef {
        let reg = builtin_registry();
        let t = Table::parse(text, &reg).unwrap_or_else(|e| panic!("{e}\n{text}"));
        t.build(&reg, &self.resolver())
            .unwrap_or_else(|e| panic!("{e}\n{text}"))
    }
}

pub fn registry() -> Registry {
    builtin_registry()
}

/// How a region of the device under test behaves.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReadB {
    Ok,
    Fail,
}
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WriteB {
    Apply,
    Ignore,
    Fail,
}

/// Flat reference model: bytes, whether each byte is known, and per-byte behaviour.
pub struct Model {
    pub data: Vec<u8>,
    pub known: Vec<bool>,
    pub read: Vec<ReadB>,
    pub write: Vec<WriteB>,
    pub discard_zeroes: bool,
}

impl Model {
    pub fn new(size: usize, discard_zeroes: bool) -> Model {
        Model {
            data: vec![0; size],
            known: vec![true; size],
            read: vec![ReadB::Ok; size],
            write: vec![WriteB::Apply; size],
            discard_zeroes,
        }
    }
    pub fn region(&mut self, start: usize, len: usize, r: ReadB, w: WriteB) {
        self.read[start..start + len].fill(r);
        self.write[start..start + len].fill(w);
    }
}

#[derive(Clone, Debug)]
pub enum Op {
    Read { off: u64, len: u64 },
    Write { off: u64, len: u64, seed: u8 },
    Discard { off: u64, len: u64 },
    WriteZeroes { off: u64, len: u64 },
    Flush,
}

/// Random ops over a device of `size` bytes; mostly sector-aligned, some byte-granular, some
/// past the end (which must fail cleanly).
pub fn ops(size: u64, max_ops: usize) -> impl Strategy<Value = Vec<Op>> {
    let max_len = (size / 2).clamp(512, 96 * 1024);
    let range = (0..size, 0..=max_len, 0u8..10).prop_map(move |(off, len, kind)| {
        match kind {
            // Sector-aligned most of the time.
            0..=6 => {
                let o = off / 512 * 512;
                let l = (len / 512 * 512).min(size - o);
                (o, l)
            }
            // Byte-granular inside the device.
            7 | 8 => (off, len.min(size - off)),
            // Possibly past the end.
            _ => (off, len),
        }
    });
    let op = (range, 0u8..12, any::<u8>()).prop_map(|((off, len), k, seed)| match k {
        0..=3 => Op::Read { off, len },
        4..=7 => Op::Write { off, len, seed },
        8 => Op::Discard { off, len },
        9 | 10 => Op::WriteZeroes { off, len },
        _ => Op::Flush,
    });
    proptest::collection::vec(op, 1..max_ops)
}

pub fn pattern(seed: u8, off: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            let x = off + i as u64;
            (x as u8) ^ ((x >> 8) as u8).wrapping_mul(31) ^ seed
        })
        .collect()
}

/// Applies a data-less or data write to the model; returns whether the device must fail.
fn model_write(m: &mut Model, off: usize, len: usize, data: Option<&[u8]>, discard: bool) -> bool {
    let mut fail = false;
    for i in 0..len {
        let p = off + i;
        match m.write[p] {
            WriteB::Fail => fail = true,
            WriteB::Ignore => {}
            WriteB::Apply => match data {
                Some(d) => {
                    m.data[p] = d[i];
                    m.known[p] = true;
                }
                None if discard && !m.discard_zeroes => m.known[p] = false,
                None => {
                    m.data[p] = 0;
                    m.known[p] = true;
                }
            },
        }
    }
    fail
}

/// Runs `ops` against `dev` and the model; panics (test failure) on any divergence.
pub fn run_ops(dev: &dyn BlockDevice, m: &mut Model, ops: &[Op]) -> Result<(), TestCaseError> {
    let size = dev.size().0;
    prop_assert_eq!(size as usize, m.data.len());
    iort::block_on(async {
        for (n, op) in ops.iter().enumerate() {
            match *op {
                Op::Read { off, len } => {
                    let mut buf = vec![0xEEu8; len as usize];
                    // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                    let r = unsafe { dev.read(Bytes(off), &mut buf) }.await;
                    if off.checked_add(len).is_none_or(|e| e > size) {
                        let e = r.expect_err("read past end must fail");
                        prop_assert_eq!(e.errno, libc::ENOSPC, "op {}: {}", n, e);
                        continue;
                    }
                    let (o, l) = (off as usize, len as usize);
                    let fail = m.read[o..o + l].contains(&ReadB::Fail);
                    if fail {
                        let e = r.expect_err("read of a failing region must fail");
                        prop_assert_eq!(e.errno, libc::EIO, "op {}: {}", n, e);
                        continue;
                    }
                    prop_assert!(r.is_ok(), "op {} {:?}: {:?}", n, op, r);
                    for (i, &got) in buf.iter().enumerate() {
                        if m.known[o + i] {
                            prop_assert_eq!(
                                got,
                                m.data[o + i],
                                "op {} {:?}: byte {} differs",
                                n,
                                op,
                                o + i
                            );
                        }
                    }
                }
                Op::Write { off, len, seed } => {
                    let data = pattern(seed, off, len as usize);
                    // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                    let r = unsafe { dev.write(Bytes(off), &data, WriteFlags::default()) }.await;
                    if off.checked_add(len).is_none_or(|e| e > size) {
                        prop_assert_eq!(r.map_err(|e| e.errno), Err(libc::ENOSPC));
                        continue;
                    }
                    let fail = model_write(m, off as usize, len as usize, Some(&data), false);
                    if fail {
                        prop_assert_eq!(r.map_err(|e| e.errno), Err(libc::EIO), "op {}", n);
                    } else {
                        prop_assert!(r.is_ok(), "op {} {:?}: {:?}", n, op, r);
                    }
                }
                Op::Discard { off, len } | Op::WriteZeroes { off, len } => {
                    let discard = matches!(op, Op::Discard { .. });
                    let r = if discard {
                        dev.discard(Bytes(off), Bytes(len)).await
                    } else {
                        dev.write_zeroes(Bytes(off), Bytes(len), WriteFlags::default())
                            .await
                    };
                    if off.checked_add(len).is_none_or(|e| e > size) {
                        prop_assert_eq!(r.map_err(|e| e.errno), Err(libc::ENOSPC));
                        continue;
                    }
                    let fail = model_write(m, off as usize, len as usize, None, discard);
                    if fail {
                        prop_assert_eq!(r.map_err(|e| e.errno), Err(libc::EIO), "op {}", n);
                    } else {
                        prop_assert!(r.is_ok(), "op {} {:?}: {:?}", n, op, r);
                    }
                }
                Op::Flush => {
                    let r = dev.flush().await;
                    prop_assert!(r.is_ok(), "flush: {:?}", r);
                }
            }
        }
        // Final full read-back of every readable known byte.
        let mut buf = vec![0u8; size as usize];
        if !m.read.contains(&ReadB::Fail) {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { dev.read(Bytes(0), &mut buf) }
                .await
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            for (i, (&got, &want)) in buf.iter().zip(&m.data).enumerate() {
                if m.known[i] {
                    prop_assert_eq!(got, want, "final read-back: byte {} differs", i);
                }
            }
        }
        Ok(())
    })
    .map_err(|e| TestCaseError::fail(e.to_string()))?
}

/// Proptest config: 24 cases unless PROPTEST_CASES says otherwise.
pub fn config(default_cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var("PROPTEST_CASES").is_err() {
        c.cases = default_cases;
    }
    c.failure_persistence = None;
    c
}
