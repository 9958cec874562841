//! A random workload against a model, for the remote-extent tests (iSCSI, Ceph): reads,
//! writes (FUA or not), write-zeroes, discards and flushes, then the device (or a file holding
//! its bytes) compared with the model.

use tables::io::{read_blocking, write_blocking};
use tables::{BlockDevice, Bytes, WriteFlags};

use crate::Rng;

/// Flushes `d`, asserting success.
pub fn flush(d: &dyn BlockDevice) {
    iort::block_on(d.flush()).unwrap().unwrap();
}

/// Random reads, writes (FUA or not), write-zeroes, discards and flushes against a model;
/// returns the model and which blocks it knows (a discarded block's contents are up to the
/// target).
pub fn model_run(dev: &dyn BlockDevice, seed: u64, ops: usize, bs: u64) -> (Vec<u8>, Vec<bool>) {
    let size = dev.size().0;
    let mut model = vec![0u8; size as usize];
    read_blocking(dev, Bytes(0), &mut model).unwrap();
    let mut known = vec![true; (size / bs) as usize];
    let mut rng = Rng(seed);
    let mut kinds = [0usize; 5];
    for i in 0..ops {
        let len = (1 + rng.below(256 * 1024 / bs)) * bs;
        let off = rng.below((size - len) / bs + 1) * bs;
        let (o, l) = (off as usize, len as usize);
        let blocks = (off / bs) as usize..((off + len) / bs) as usize;
        match rng.below(10) {
            0..=3 => {
                let data: Vec<u8> = (0..l).map(|_| rng.next_u64() as u8).collect();
                let flags = if rng.below(4) == 0 {
                    WriteFlags::FUA
                } else {
                    WriteFlags::default()
                };
                write_blocking(dev, Bytes(off), &data, flags).unwrap();
                model[o..o + l].copy_from_slice(&data);
                known[blocks].fill(true);
                kinds[0] += 1;
            }
            4 => {
                iort::block_on(dev.write_zeroes(Bytes(off), Bytes(len), WriteFlags::default()))
                    .unwrap()
                    .unwrap();
                model[o..o + l].fill(0);
                known[blocks].fill(true);
                kinds[1] += 1;
            }
            5 => {
                flush(dev);
                kinds[2] += 1;
            }
            6 => {
                iort::block_on(dev.discard(Bytes(off), Bytes(len)))
                    .unwrap()
                    .unwrap();
                known[blocks].fill(false);
                kinds[3] += 1;
            }
            _ => {
                let mut got = vec![0xa5u8; l];
                read_blocking(dev, Bytes(off), &mut got).unwrap();
                for (k, b) in blocks.clone().enumerate() {
                    let (a, z) = (k * bs as usize, (k + 1) * bs as usize);
                    assert!(
                        !known[b] || got[a..z] == model[o + a..o + z],
                        "op {i}: read at {off} length {len}: block {b} differs"
                    );
                }
                kinds[4] += 1;
            }
        }
    }
    assert!(
        kinds.iter().all(|&n| n > 0),
        "some kind of op never ran: {kinds:?}"
    );
    compare(dev, &model, &known, bs, "final contents");
    (model, known)
}

/// Every known block of `got` (the device, or a file's bytes) equals the model's.
pub fn compare_bytes(got: &[u8], model: &[u8], known: &[bool], bs: u64, what: &str) {
    assert_eq!(got.len(), model.len(), "{what}: size");
    let bs = bs as usize;
    for (b, k) in known.iter().enumerate() {
        assert!(
            !k || got[b * bs..(b + 1) * bs] == model[b * bs..(b + 1) * bs],
            "{what}: block {b} (byte {}) differs from the model",
            b * bs
        );
    }
}

/// Every known block of `dev` equals the model's.
pub fn compare(dev: &dyn BlockDevice, model: &[u8], known: &[bool], bs: u64, what: &str) {
    let mut all = vec![0u8; model.len()];
    read_blocking(dev, Bytes(0), &mut all).unwrap();
    compare_bytes(&all, model, known, bs, what);
}
