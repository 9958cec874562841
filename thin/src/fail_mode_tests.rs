//! A panic while the metadata lock is held puts the pool in fail mode: nothing of the
//! half-changed metadata is ever committed (not by I/O, not by the background committer,
//! not by the final commit on drop), and the device still holds the last good commit.

use std::sync::Arc;
use std::time::Duration;

use tables::io::{read_blocking, write_blocking, BlockDevice};
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, WriteFlags};

use crate::{tools, Pool, PoolOptions, ThinDevice, ThinId};

const MIB: u64 = 1 << 20;
const META: u64 = 4 * MIB;

fn run<T>(f: impl std::future::Future<Output = T>) -> T {
    iort::block_on(f).expect("runtime")
}

fn opts(commit_interval: Option<Duration>) -> PoolOptions {
    PoolOptions {
        data_block_sectors: 8,
        commit_interval,
        error_if_no_space: true,
        ..PoolOptions::default()
    }
}

struct Failed {
    meta: Arc<MemDevice>,
    data: Arc<MemDevice>,
    pool: Arc<Pool>,
    thin: Arc<ThinDevice>,
    /// The metadata device as of the last good commit.
    durable: Vec<u8>,
}

/// A pool with block 0 of thin 1 committed, then a write whose `map_insert` panics half way
/// with the metadata lock held.
fn panic_in_map_insert(commit_interval: Option<Duration>) -> Failed {
    let meta = Arc::new(MemDevice::new("meta", Bytes(META)));
    let data = Arc::new(MemDevice::new("data", Bytes(8 * MIB)));
    let pool = run(Pool::open(
        meta.clone(),
        data.clone(),
        opts(commit_interval),
    ))
    .unwrap();
    pool.create_thin(ThinId(1)).unwrap();
    let thin = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    run(async {
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { thin.write(Bytes(0), &[1; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        pool.commit().await.unwrap();
    });
    // Nothing is dirty until the next write's mapping, so this is the last good commit.
    let durable = meta.snapshot(0, META as usize);
    crate::fault::arm_map_insert_panic();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        write_blocking(&*thin, Bytes(8192), &[2; 4096], WriteFlags::default())
    }));
    assert!(r.is_err(), "the fault point did not fire");
    Failed {
        meta,
        data,
        pool,
        thin,
        durable,
    }
}

/// The metadata device is exactly the last good commit, checks clean, and reopens with
/// block 0 written and the panicked write's block unmapped.
fn last_good_commit_survives(f: Failed) {
    let Failed {
        meta,
        data,
        pool,
        thin,
        durable,
    } = f;
    drop(thin);
    drop(pool);
    assert!(
        meta.snapshot(0, META as usize) == durable,
        "metadata was written after the panic"
    );
    let md: DeviceRef = meta.clone();
    let r = run(tools::check(&md)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    let pool = run(Pool::open(md, data, opts(None))).unwrap();
    let t = pool.thin(ThinId(1), Bytes(MIB), None).unwrap();
    let mut buf = [0u8; 4096];
    read_blocking(&*t, Bytes(0), &mut buf).unwrap();
    assert_eq!(buf, [1; 4096]);
    read_blocking(&*t, Bytes(8192), &mut buf).unwrap();
    assert_eq!(
        buf, [0; 4096],
        "the write that panicked is not in the last commit"
    );
    assert_eq!(pool.stats().mode, "rw");
}

#[test]
fn panic_with_the_metadata_lock_held_fails_the_pool() {
    let f = panic_in_map_insert(None);
    let (pool, t) = (&f.pool, &f.thin);
    let s = pool.stats();
    assert_eq!(s.mode, "fail", "{s:?}");
    let line = pool.status_line();
    assert!(
        line.contains(" fail ") && line.contains("needs_check"),
        "{line}"
    );
    let e = write_blocking(&**t, Bytes(16384), &[3; 4096], WriteFlags::default()).unwrap_err();
    assert_eq!(e.errno, libc::EIO, "{e}");
    let e = read_blocking(&**t, Bytes(0), &mut [0; 4096]).unwrap_err();
    assert_eq!(e.errno, libc::EIO, "reads of half-changed metadata: {e}");
    assert!(pool.create_thin(ThinId(2)).is_err());
    assert!(pool.devices().is_err());
    let e = run(pool.commit()).unwrap_err();
    assert_eq!(e.errno, libc::EIO, "{e}");
    last_good_commit_survives(f);
}

#[test]
fn background_committer_does_not_commit_after_a_panic() {
    // The committer runs every 10 ms and commits what is 20 ms old: it has had many
    // chances during the sleep, and nothing else touched the pool since the panic.
    let f = panic_in_map_insert(Some(Duration::from_millis(20)));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        f.meta.snapshot(0, META as usize) == f.durable,
        "the background committer wrote metadata after the panic"
    );
    assert_eq!(f.pool.stats().mode, "fail");
    last_good_commit_survives(f);
}

#[test]
fn final_commit_on_drop_does_not_commit_after_a_panic() {
    // Dropped right after the panic: the final commit is the first to take the lock.
    last_good_commit_survives(panic_in_map_insert(None));
}
