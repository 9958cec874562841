//! Property test: batches of concurrent reads, writes, write-zeroes, discards and flushes at
//! random (aligned and unaligned) offsets, lengths and buffer addresses, against a `Vec<u8>`
//! model, on a direct-I/O file (ext4) and a buffered one (tmpfs).

mod common;

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

use common::{pattern, TestBuf};
use extents::{create_sparse, FileExtent, IoMode, OpenOptions};
use proptest::prelude::*;
use tables::{BlockDevice, Bytes, WriteFlags};

const SIZE: u64 = 256 * 1024;

#[derive(Clone, Debug)]
enum Op {
    Read {
        off: u64,
        len: u64,
        shift: usize,
    },
    Write {
        off: u64,
        len: u64,
        shift: usize,
        seed: u64,
        fua: bool,
    },
    Zero {
        off: u64,
        len: u64,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
}

impl Op {
    fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Read { off, len, .. }
            | Op::Write { off, len, .. }
            | Op::Zero { off, len }
            | Op::Discard { off, len } => Some((off, off + len)),
            Op::Flush => None,
        }
    }
}

/// Offsets and lengths: sector-aligned, page-aligned, or any byte.
fn range() -> impl Strategy<Value = (u64, u64)> {
    let unit = prop_oneof![Just(1u64), Just(512u64), Just(4096u64)];
    (unit, 0..SIZE, 1u64..24 * 1024).prop_map(|(u, off, len)| {
        let off = off / u * u;
        let len = (len.div_ceil(u) * u).min(SIZE - off).max(1);
        (off, len)
    })
}

fn op() -> impl Strategy<Value = Op> {
    let shift = prop_oneof![3 => Just(0usize), 1 => 1usize..600];
    prop_oneof![
        4 => (range(), shift.clone()).prop_map(|((off, len), shift)| Op::Read { off, len, shift }),
        5 => (range(), shift, any::<u64>(), prop::bool::weighted(0.2)).prop_map(
            |((off, len), shift, seed, fua)| Op::Write { off, len, shift, seed, fua }
        ),
        1 => range().prop_map(|(off, len)| Op::Zero { off, len }),
        1 => range().prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
    ]
}

/// Batches whose ops touch disjoint ranges (overlapping ones are dropped).
fn batches() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(prop::collection::vec(op(), 1..8), 1..6).prop_map(|bs| {
        bs.into_iter()
            .map(|b| {
                let mut kept: Vec<Op> = Vec::new();
                for o in b {
                    let clash = o.range().is_some_and(|(s, e)| {
                        kept.iter()
                            .filter_map(Op::range)
                            .any(|(s2, e2)| s < e2 && s2 < e)
                    });
                    if !clash {
                        kept.push(o);
                    }
                }
                kept
            })
            .collect()
    })
}

/// An op and what it returned (read data, or nothing).
type OpResult = (Op, Result<Vec<u8>, tables::IoError>);

fn run(dev: Arc<FileExtent>, batches: Vec<Vec<Op>>) {
    let mut model = vec![0u8; SIZE as usize];
    iort::block_on(async {
        for batch in batches {
            let results: Rc<RefCell<Vec<OpResult>>> = Rc::default();
            let mut waits = Vec::new();
            for o in batch.iter().cloned() {
                let (tx, rx) = futures::channel::oneshot::channel::<()>();
                waits.push(rx);
                let dev = dev.clone();
                let results = results.clone();
                iort::spawn(async move {
                    let r = match o {
                        Op::Read { off, len, shift } => {
                            let mut b = TestBuf::new(len as usize, shift);
                            // SAFETY: the buffer belongs to this spawned task, which awaits the
                            // call to its end.
                            unsafe { dev.read(Bytes(off), b.as_mut()) }
                                .await
                                .map(|_| b.as_ref().to_vec())
                        }
                        Op::Write {
                            off,
                            len,
                            shift,
                            seed,
                            fua,
                        } => {
                            let b = TestBuf::filled(&pattern(seed, len as usize), shift);
                            let flags = if fua {
                                WriteFlags::FUA
                            } else {
                                WriteFlags::default()
                            };
                            // SAFETY: the buffer belongs to this spawned task, which awaits the
                            // call to its end.
                            unsafe { dev.write(Bytes(off), b.as_ref(), flags) }
                                .await
                                .map(|_| Vec::new())
                        }
                        Op::Zero { off, len } => dev
                            .write_zeroes(Bytes(off), Bytes(len), WriteFlags::default())
                            .await
                            .map(|_| Vec::new()),
                        Op::Discard { off, len } => dev
                            .discard(Bytes(off), Bytes(len))
                            .await
                            .map(|_| Vec::new()),
                        Op::Flush => dev.flush().await.map(|_| Vec::new()),
                    };
                    results.borrow_mut().push((o, r));
                    let _ = tx.send(());
                })
                .unwrap();
            }
            for w in waits {
                w.await.unwrap();
            }
            // Ranges are disjoint, so every read sees the state before the batch.
            for (o, r) in results.borrow_mut().drain(..) {
                let data = r.unwrap_or_else(|e| panic!("{o:?} failed: {e}"));
                match o {
                    Op::Read { off, len, .. } => {
                        let want = &model[off as usize..(off + len) as usize];
                        assert!(data == want, "{o:?} read back wrong data");
                    }
                    Op::Write { off, len, seed, .. } => {
                        model[off as usize..(off + len) as usize]
                            .copy_from_slice(&pattern(seed, len as usize));
                    }
                    Op::Zero { off, len } | Op::Discard { off, len } => {
                        model[off as usize..(off + len) as usize].fill(0)
                    }
                    Op::Flush => {}
                }
            }
        }
        // Whole device, through the extent and through the page cache.
        let mut all = TestBuf::new(SIZE as usize, 0);
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { dev.read(Bytes(0), all.as_mut()) }.await.unwrap();
        assert!(
            all.as_ref() == &model[..],
            "final contents differ from the model"
        );
        dev.flush().await.unwrap();
    })
    .unwrap();
    let on_disk = std::fs::read(dev.path()).unwrap();
    assert_eq!(on_disk.len() as u64, SIZE);
    assert!(on_disk == model, "file contents differ from the model");
}

fn open(dir: &Path) -> Arc<FileExtent> {
    let p = dir.join("model.img");
    create_sparse(&p, Bytes(SIZE)).unwrap();
    Arc::new(FileExtent::open(&p, OpenOptions::default()).unwrap())
}

fn config() -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = 128;
    }
    c
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn direct_file_matches_model(b in batches()) {
        let dir = common::direct_dir();
        let dev = open(dir.path());
        prop_assert!(matches!(dev.io_mode(), IoMode::Direct { .. }), "{:?}", dev.io_mode());
        run(dev, b);
    }

    #[test]
    fn buffered_file_matches_model(b in batches()) {
        let dir = common::tmpfs_dir();
        let dev = open(dir.path());
        prop_assert!(matches!(dev.io_mode(), IoMode::Buffered { .. }), "{:?}", dev.io_mode());
        run(dev, b);
    }
}
