//! File extents: mode choice, FUA/flush, discard, read-only, bounds, end of file, errors,
//! concurrency of mixed aligned and unaligned writes, and the resolver.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use common::{pattern, st_blocks, TestBuf};
use extents::{
    create_sparse, DirectMode, ExtentError, ExtentKind, FileExtent, FileResolver, IoMode,
    OpenOptions, RelativePaths,
};
use tables::io::{read_blocking, write_blocking};
use tables::registry::Resolver;
use tables::{BlockDevice, Bytes, WriteFlags};

fn open_new(dir: &std::path::Path, name: &str, size: u64, opts: OpenOptions) -> FileExtent {
    let p = dir.join(name);
    create_sparse(&p, Bytes(size)).unwrap();
    FileExtent::open(&p, opts).unwrap()
}

/// The safe blocking helpers drive a file extent's I/O on a ring of their own (created on
/// first use, on whichever thread calls them): aligned and unaligned, direct and buffered.
#[test]
fn blocking_helpers_work_on_a_file_extent() {
    let d = common::direct_dir();
    let t = common::tmpfs_dir();
    for dir in [d.path(), t.path()] {
        let e = open_new(dir, "h.img", 1 << 20, OpenOptions::default());
        let p = dir.join("h.img");
        std::thread::spawn(move || {
            let data = pattern(3, 8192);
            write_blocking(&e, Bytes(4096), &data, WriteFlags::FUA).unwrap();
            write_blocking(&e, Bytes(70_001), &data[..1000], WriteFlags::default()).unwrap();
            let mut back = vec![0u8; 8192];
            read_blocking(&e, Bytes(4096), &mut back).unwrap();
            assert!(back == data);
            let mut odd = vec![0u8; 1000];
            read_blocking(&e, Bytes(70_001), &mut odd).unwrap();
            assert!(odd[..] == data[..1000]);
            let file = std::fs::read(&p).unwrap();
            assert!(file[4096..4096 + 8192] == data[..], "on the file itself");
            let err = read_blocking(&e, Bytes((1 << 20) - 512), &mut back).unwrap_err();
            assert_eq!(err.errno, libc::ENOSPC, "{err}");
            assert!(err.msg.contains(p.to_str().unwrap()), "{err}");
        })
        .join()
        .unwrap();
    }
}

#[test]
fn direct_on_ext4_buffered_on_tmpfs() {
    let d = common::direct_dir();
    let e = open_new(d.path(), "a.img", 1 << 20, OpenOptions::default());
    assert_eq!(e.kind(), ExtentKind::File);
    assert_eq!(e.size(), Bytes(1 << 20));
    match e.io_mode() {
        IoMode::Direct {
            mem_align,
            offset_align,
        } => {
            assert!(
                mem_align.is_power_of_two() && *offset_align >= 512,
                "{mem_align}/{offset_align}"
            );
        }
        m => panic!("ext4 should give direct I/O, got {m:?}"),
    }
    assert!(e.status().contains("direct"), "{}", e.status());

    let t = common::tmpfs_dir();
    let e = open_new(t.path(), "a.img", 1 << 20, OpenOptions::default());
    match e.io_mode() {
        IoMode::Buffered { reason } => assert!(reason.contains("tmpfs"), "{reason}"),
        m => panic!("tmpfs should fall back to buffered, got {m:?}"),
    }
    // Always refuses what Auto falls back from, naming the path.
    let p = t.path().join("a.img");
    let err = FileExtent::open(
        &p,
        OpenOptions {
            direct: DirectMode::Always,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, ExtentError::Unsupported { .. }), "{err}");
    assert!(err.to_string().contains(p.to_str().unwrap()), "{err}");

    let e = FileExtent::open(
        d.path().join("a.img"),
        OpenOptions {
            direct: DirectMode::Never,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(!e.is_direct());

    // A size that O_DIRECT cannot cover falls back too.
    let e = open_new(d.path(), "odd.img", 1000, OpenOptions::default());
    assert!(!e.is_direct(), "{:?}", e.io_mode());
    assert_eq!(e.size(), Bytes(1000));
    // ...and really does buffered I/O (O_DIRECT cleared): odd offsets and lengths work.
    iort::block_on(async {
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.write(Bytes(3), &[5u8; 997], WriteFlags::default()) }
            .await
            .unwrap();
        let mut b = vec![1u8; 7];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(993), &mut b) }.await.unwrap();
        assert_eq!(b, [5u8; 7]);
    })
    .unwrap();
}

#[test]
fn limits_are_honest_for_files() {
    let d = common::direct_dir();
    let e = open_new(d.path(), "a.img", 1 << 20, OpenOptions::default());
    let l = e.limits();
    assert_eq!(l.logical_block_size, 512);
    assert!(l.physical_block_size >= 512);
    assert_eq!(l.discard_granularity, 4096);
    assert!(l.discard_zeroes && l.write_zeroes && l.volatile_cache && l.fua);
    assert!(l.multi_conn_safe && !l.read_only);
}

#[test]
fn open_errors_name_the_path() {
    let d = common::direct_dir();
    let missing = d.path().join("missing.img");
    let err = FileExtent::open(&missing, OpenOptions::default()).unwrap_err();
    assert_eq!(err.errno(), libc::ENOENT);
    let s = err.to_string();
    assert!(s.contains("missing.img") && s.contains("open"), "{s}");
    let err = FileExtent::open("/dev/null", OpenOptions::default()).unwrap_err();
    let s = err.to_string();
    assert!(
        s.contains("/dev/null: not a regular file or block device"),
        "{s}"
    );
}

#[test]
fn fua_write_and_flush_succeed_in_both_modes() {
    for dir in [common::direct_dir(), common::tmpfs_dir()] {
        let e = open_new(dir.path(), "f.img", 1 << 20, OpenOptions::default());
        iort::block_on(async {
            let data = TestBuf::filled(&pattern(1, 8192), 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.write(Bytes(4096), data.as_ref(), WriteFlags::FUA) }
                .await
                .unwrap();
            // Unaligned FUA write goes through the bounce path with RWF_DSYNC too.
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.write(Bytes(100), &pattern(2, 333), WriteFlags::FUA) }
                .await
                .unwrap();
            e.flush().await.unwrap();
            e.write_zeroes(Bytes(65536), Bytes(4096), WriteFlags::FUA)
                .await
                .unwrap();
            let mut back = TestBuf::new(8192, 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(4096), back.as_mut()) }.await.unwrap();
            assert!(back.as_ref() == data.as_ref());
            let mut back = vec![0u8; 333];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(100), &mut back) }.await.unwrap();
            assert_eq!(back, pattern(2, 333));
        })
        .unwrap();
    }
}

#[test]
fn discard_punches_holes() {
    for dir in [common::direct_dir(), common::tmpfs_dir()] {
        let e = open_new(dir.path(), "d.img", 2 << 20, OpenOptions::default());
        let p = e.path().to_path_buf();
        iort::block_on(async {
            let data = TestBuf::filled(&pattern(3, 1 << 20), 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.write(Bytes(0), data.as_ref(), WriteFlags::default()) }
                .await
                .unwrap();
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.write(Bytes(1 << 20), data.as_ref(), WriteFlags::default()) }
                .await
                .unwrap();
            e.flush().await.unwrap();
            let before = st_blocks(&p);
            assert!(
                before >= 4096,
                "2 MiB written should allocate, st_blocks={before}"
            );
            e.discard(Bytes(0), Bytes(1 << 20)).await.unwrap();
            let after = st_blocks(&p);
            assert!(
                after + 2000 <= before,
                "discard of 1 MiB must free blocks: {before} -> {after}"
            );
            // Unaligned discard: exact bytes read back as zeroes, neighbours untouched.
            e.discard(Bytes((1 << 20) + 1000), Bytes(10_000))
                .await
                .unwrap();
            let mut back = vec![0u8; 2 << 20];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(0), &mut back) }.await.unwrap();
            assert!(back[..1 << 20].iter().all(|&b| b == 0));
            let second = &back[1 << 20..];
            let src = data.as_ref();
            assert_eq!(second[..1000], src[..1000]);
            assert!(second[1000..11_000].iter().all(|&b| b == 0));
            assert_eq!(second[11_000..], src[11_000..]);
        })
        .unwrap();
    }
}

#[test]
fn write_zeroes_zeroes_exact_ranges() {
    for dir in [common::direct_dir(), common::tmpfs_dir()] {
        let e = open_new(dir.path(), "z.img", 1 << 20, OpenOptions::default());
        iort::block_on(async {
            let data = pattern(4, 1 << 20);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.write(Bytes(0), &data, WriteFlags::default()) }
                .await
                .unwrap();
            e.write_zeroes(Bytes(777), Bytes(200_000), WriteFlags::default())
                .await
                .unwrap();
            let mut back = vec![1u8; 1 << 20];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(0), &mut back) }.await.unwrap();
            assert_eq!(back[..777], data[..777]);
            assert!(back[777..200_777].iter().all(|&b| b == 0));
            assert_eq!(back[200_777..], data[200_777..]);
        })
        .unwrap();
    }
}

#[test]
fn read_only_refuses_writes_with_erofs() {
    let d = common::direct_dir();
    let p = d.path().join("ro.img");
    create_sparse(&p, Bytes(1 << 20)).unwrap();
    std::fs::write(&p, pattern(5, 1 << 20)).unwrap();
    let e = FileExtent::open(
        &p,
        OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(e.limits().read_only);
    iort::block_on(async {
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let err = unsafe { e.write(Bytes(4096), &[1u8; 512], WriteFlags::default()) }
            .await
            .unwrap_err();
        assert_eq!(err.errno, libc::EROFS);
        assert!(
            err.msg.contains(p.to_str().unwrap()) && err.msg.contains("4096"),
            "{err}"
        );
        let err = e.discard(Bytes(0), Bytes(4096)).await.unwrap_err();
        assert_eq!(err.errno, libc::EROFS);
        let err = e
            .write_zeroes(Bytes(0), Bytes(4096), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(err.errno, libc::EROFS);
        e.flush().await.unwrap();
        let mut b = vec![0u8; 1000];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(10), &mut b) }.await.unwrap();
        assert_eq!(b, pattern(5, 1 << 20)[10..1010]);
    })
    .unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), pattern(5, 1 << 20));
}

#[test]
fn out_of_range_is_enospc_naming_the_path() {
    let d = common::direct_dir();
    let e = open_new(d.path(), "r.img", 1 << 20, OpenOptions::default());
    let name = e.path().to_str().unwrap().to_string();
    iort::block_on(async {
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let err = unsafe { e.write(Bytes((1 << 20) - 512), &[0u8; 1024], WriteFlags::default()) }
            .await
            .unwrap_err();
        assert_eq!(err.errno, libc::ENOSPC);
        assert!(err.to_string().contains(&name), "{err}");
        let mut b = [0u8; 1];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let err = unsafe { e.read(Bytes(1 << 20), &mut b) }.await.unwrap_err();
        assert_eq!(err.errno, libc::ENOSPC);
        let err = e
            .discard(Bytes(u64::MAX - 10), Bytes(100))
            .await
            .unwrap_err();
        assert_eq!(err.errno, libc::ENOSPC);
    })
    .unwrap();
}

/// A file cut shorter behind a live extent: what is still there reads back, anything that
/// reaches past the new end fails with EIO naming the path, the offset and the new length
/// (not zeroes: that data is gone), and writes do not grow the file back.
#[test]
fn io_past_the_end_of_a_shrunken_file_fails() {
    for dir in [common::direct_dir(), common::tmpfs_dir()] {
        let e = open_new(dir.path(), "s.img", 64 * 1024, OpenOptions::default());
        let p = e.path().to_path_buf();
        let name = p.to_str().unwrap().to_string();
        let data = pattern(6, 64 * 1024);
        iort::block_on(async {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.write(Bytes(0), &data, WriteFlags::default()) }
                .await
                .unwrap();
        })
        .unwrap();
        // Someone truncates the file underneath to an unaligned length.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(1000)
            .unwrap();
        iort::block_on(async {
            let mode = e.io_mode();
            let expect_eio = |err: tables::IoError, at: u64| {
                assert_eq!(err.errno, libc::EIO, "{mode:?}: {err}");
                let s = err.to_string();
                let at = format!("at byte {at} ");
                for want in [name.as_str(), at.as_str(), "is now 1000 bytes", "shrank"] {
                    assert!(s.contains(want), "{mode:?}: no {want:?} in {s}");
                }
            };
            // Within the new end: the data, aligned or not.
            let mut head = TestBuf::new(512, 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(0), head.as_mut()) }.await.unwrap();
            assert_eq!(head.as_ref(), &data[..512], "{mode:?}");
            let mut part = vec![7u8; 500];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(500), &mut part) }.await.unwrap();
            assert_eq!(part, data[500..1000], "{mode:?}");
            // Past it: aligned, unaligned, and wholly beyond.
            let mut all = TestBuf::new(64 * 1024, 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            expect_eio(
                unsafe { e.read(Bytes(0), all.as_mut()) }.await.unwrap_err(),
                0,
            );
            let mut part = vec![7u8; 3000];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            expect_eio(
                unsafe { e.read(Bytes(500), &mut part) }.await.unwrap_err(),
                500,
            );
            let mut far = TestBuf::new(4096, 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            expect_eio(
                unsafe { e.read(Bytes(8192), far.as_mut()) }
                    .await
                    .unwrap_err(),
                8192,
            );
            // Writes past the end fail and leave the length alone.
            let blk = TestBuf::filled(&[9u8; 4096], 0);
            // SAFETY: awaited on the next line, in block_on: completed or dropped before the buffer
            // goes.
            let err = unsafe { e.write(Bytes(8192), blk.as_ref(), WriteFlags::default()) };
            expect_eio(err.await.unwrap_err(), 8192);
            // SAFETY: as above.
            let err = unsafe { e.write(Bytes(900), &[9u8; 200], WriteFlags::default()) };
            expect_eio(err.await.unwrap_err(), 900);
            let err = e.write_zeroes(Bytes(4096), Bytes(4096), WriteFlags::default());
            expect_eio(err.await.unwrap_err(), 4096);
            let err = e.discard(Bytes(4096), Bytes(4096)).await.unwrap_err();
            expect_eio(err, 4096);
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 1000, "{mode:?}");
            // A write within the new end still lands.
            let w = TestBuf::filled(&[3u8; 512], 0);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.write(Bytes(0), w.as_ref(), WriteFlags::default()) }
                .await
                .unwrap();
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { e.read(Bytes(0), head.as_mut()) }.await.unwrap();
            assert_eq!(head.as_ref(), &[3u8; 512][..]);
        })
        .unwrap();
    }
}

#[test]
fn errors_propagate_with_errno_path_and_offset() {
    // A 64 KiB tmpfs cannot hold the 1 MiB extent: writing there fails with ENOSPC from the
    // file system, which must come back as an error naming path and offset, not a panic.
    let fs = common::SmallTmpfs::mount("64k");
    let e = open_new(fs.path(), "full.img", 1 << 20, OpenOptions::default());
    let name = e.path().to_str().unwrap().to_string();
    iort::block_on(async {
        let big = vec![1u8; 256 * 1024];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let err = unsafe { e.write(Bytes(512 * 1024), &big, WriteFlags::default()) }
            .await
            .unwrap_err();
        assert_eq!(err.errno, libc::ENOSPC, "{err}");
        let s = err.to_string();
        assert!(s.contains(&name) && s.contains("write at byte"), "{s}");
        assert!(s.contains("ENOSPC"), "{s}");
    })
    .unwrap();
}

#[test]
fn io_without_a_runtime_is_an_error_not_a_panic() {
    let d = common::direct_dir();
    let e = open_new(d.path(), "n.img", 1 << 20, OpenOptions::default());
    let mut b = TestBuf::new(4096, 0);
    // No ring on purpose (read_blocking would bring one): the plain executor.
    // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
    let err = futures::executor::block_on(unsafe { e.read(Bytes(0), b.as_mut()) }).unwrap_err();
    assert_eq!(err.errno, libc::ENXIO);
    assert!(err.msg.contains("read at byte 0 length 4096"), "{err}");
}

/// Many unaligned writes that share 512-byte blocks, interleaved with aligned writes to the
/// neighbouring blocks, all in flight at once (and from two threads): read-modify-write must
/// not lose anyone's bytes.
#[test]
fn concurrent_mixed_aligned_and_unaligned_writes_to_nearby_ranges() {
    let d = common::direct_dir();
    const SIZE: u64 = 256 * 1024;
    let e = Arc::new(open_new(d.path(), "c.img", SIZE, OpenOptions::default()));
    assert!(e.is_direct());
    // Cut every even 512-byte block into irregular pieces; odd blocks get aligned writes.
    let mut pieces: Vec<(u64, usize)> = Vec::new();
    let cuts = [0usize, 37, 100, 101, 250, 333, 400, 511, 512];
    let mut aligned: Vec<u64> = Vec::new();
    for blk in 0..(SIZE / 512) {
        if blk % 2 == 0 {
            for w in cuts.windows(2) {
                pieces.push((blk * 512 + w[0] as u64, w[1] - w[0]));
            }
        } else {
            aligned.push(blk * 512);
        }
    }
    let mut model = vec![0u8; SIZE as usize];
    for round in 0..3u64 {
        let seed = move |off: u64| round * 1_000_000 + off;
        for &(off, len) in &pieces {
            model[off as usize..off as usize + len].copy_from_slice(&pattern(seed(off), len));
        }
        for &off in &aligned {
            model[off as usize..off as usize + 512].copy_from_slice(&pattern(seed(off), 512));
        }
        // Two threads, each with its own runtime, take alternate pieces of the same blocks.
        let mut threads = Vec::new();
        for t in 0..2usize {
            let e = e.clone();
            let mine: Vec<(u64, usize)> = pieces.iter().copied().skip(t).step_by(2).collect();
            let mine_aligned: Vec<u64> = aligned.iter().copied().skip(t).step_by(2).collect();
            threads.push(std::thread::spawn(move || {
                let rt = iort::Runtime::new(256).unwrap();
                rt.block_on(async {
                    let done = Rc::new(RefCell::new(0usize));
                    let total = mine.len() + mine_aligned.len();
                    for (off, len) in mine {
                        let (e, done) = (e.clone(), done.clone());
                        iort::spawn(async move {
                            let b = TestBuf::filled(&pattern(seed(off), len), 1);
                            // SAFETY: the buffer belongs to this spawned task, which awaits the
                            // call to its end.
                            unsafe { e.write(Bytes(off), b.as_ref(), WriteFlags::default()) }
                                .await
                                .unwrap();
                            *done.borrow_mut() += 1;
                        })
                        .unwrap();
                    }
                    for off in mine_aligned {
                        let (e, done) = (e.clone(), done.clone());
                        iort::spawn(async move {
                            let b = TestBuf::filled(&pattern(seed(off), 512), 0);
                            // SAFETY: the buffer belongs to this spawned task, which awaits the
                            // call to its end.
                            unsafe { e.write(Bytes(off), b.as_ref(), WriteFlags::default()) }
                                .await
                                .unwrap();
                            *done.borrow_mut() += 1;
                        })
                        .unwrap();
                    }
                    while *done.borrow() < total {
                        iort::sleep(std::time::Duration::from_millis(1)).await;
                    }
                });
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        let mut back = TestBuf::new(SIZE as usize, 0);
        read_blocking(&*e, Bytes(0), back.as_mut()).unwrap();
        let bad = back.as_ref().iter().zip(&model).position(|(a, b)| a != b);
        assert!(bad.is_none(), "round {round}: first wrong byte at {bad:?}");
    }
}

#[test]
fn resolver_shares_one_extent_per_file() {
    let d = common::direct_dir();
    let a = d.path().join("a.img");
    let b = d.path().join("b.img");
    create_sparse(&a, Bytes(1 << 20)).unwrap();
    create_sparse(&b, Bytes(1 << 20)).unwrap();
    std::os::unix::fs::symlink(&a, d.path().join("link.img")).unwrap();
    let r = FileResolver::default();
    let x = r.open_extent(a.to_str().unwrap()).unwrap();
    let y = r.open_extent(a.to_str().unwrap()).unwrap();
    let z = r
        .open_extent(d.path().join("link.img").to_str().unwrap())
        .unwrap();
    let w = r.open_extent(b.to_str().unwrap()).unwrap();
    assert!(Arc::ptr_eq(&x, &y) && Arc::ptr_eq(&x, &z));
    assert!(!Arc::ptr_eq(&x, &w));
    // Through the trait object too.
    let dev = r.open(a.to_str().unwrap()).unwrap();
    assert_eq!(dev.size(), Bytes(1 << 20));
    assert_eq!(
        dev.name(),
        std::fs::canonicalize(&a).unwrap().to_str().unwrap()
    );
    // Once every holder is gone the file is opened afresh.
    let addr = Arc::as_ptr(&x) as usize;
    drop((x, y, z, dev));
    let again = r.open_extent(a.to_str().unwrap()).unwrap();
    assert_eq!(again.size(), Bytes(1 << 20));
    let _ = addr;
    let err = r.open("/nonexistent/dev.img").err().unwrap();
    assert!(err.contains("/nonexistent/dev.img"), "{err}");
}

/// A daemon's working directory means nothing to the tables it is sent: a resolver told to
/// refuse relative paths names the path and asks for an absolute one; one given a base
/// directory takes them from there; absolute paths and device numbers are unaffected.
#[test]
fn resolver_refuses_or_bases_relative_paths() {
    let d = common::direct_dir();
    let a = d.path().join("a.img");
    create_sparse(&a, Bytes(1 << 20)).unwrap();
    let abs = a.to_str().unwrap();

    let refusing = FileResolver::default().relative_paths(RelativePaths::Refuse);
    for rel in ["a.img", "./a.img", "sub/../a.img"] {
        let err = refusing.open_extent(rel).unwrap_err();
        assert!(matches!(err, ExtentError::RelativePath { .. }), "{err}");
        assert_eq!(err.errno(), libc::EINVAL);
        let want = format!("table names relative path '{rel}': give an absolute path");
        assert_eq!(err.to_string(), want);
        let err = refusing.open(rel).err().unwrap();
        assert_eq!(err, want, "through the Resolver trait");
    }
    assert_eq!(refusing.open_extent(abs).unwrap().size(), Bytes(1 << 20));
    // A device number is not a path: it is looked up, not refused.
    let err = refusing
        .open_extent("4095:1048575")
        .unwrap_err()
        .to_string();
    assert!(err.contains("find block device 4095:1048575"), "{err}");

    let based = FileResolver::default().relative_paths(RelativePaths::Base(d.path().into()));
    let x = based.open_extent("a.img").unwrap();
    let y = based.open_extent(abs).unwrap();
    assert!(
        Arc::ptr_eq(&x, &y),
        "the base-relative name is the same file"
    );
    let err = based.open_extent("missing.img").unwrap_err().to_string();
    let missing = d.path().join("missing.img");
    assert!(err.contains(missing.to_str().unwrap()), "{err}");

    let bad_base = FileResolver::default().relative_paths(RelativePaths::Base("rel/dir".into()));
    let err = bad_base.open_extent("a.img").unwrap_err().to_string();
    assert!(
        err.contains("relative path 'a.img'") && err.contains("'rel/dir' is not absolute"),
        "{err}"
    );
    assert!(bad_base.open_extent(abs).is_ok());
}

/// Large requests on a file in RAM go out as parallel async pieces (`ram_parallel`); a
/// request that is unaligned or crosses many pieces must read back exactly as the sequential
/// path would, and one that meets a shrunken end of file must fail as it does.
#[test]
fn large_requests_in_ram_round_trip_across_pieces() {
    let dir = common::tmpfs_dir();
    let e = open_new(dir.path(), "big.img", 4 << 20, OpenOptions::default());
    iort::block_on(async {
        let data = pattern(9, (3 << 20) + 12_345);
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.write(Bytes(777), &data, WriteFlags::default()) }
            .await
            .unwrap();
        let mut back = vec![0u8; data.len() + 1000];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(277), &mut back) }.await.unwrap();
        assert!(back[..500].iter().all(|&b| b == 0));
        assert!(back[500..500 + data.len()] == data[..]);
        assert!(back[500 + data.len()..].iter().all(|&b| b == 0));
        // Someone truncates the file under us: the pieces past the new end read nothing, and
        // the read is an error; one that stays within the new end reads the data.
        std::fs::OpenOptions::new()
            .write(true)
            .open(e.path())
            .unwrap()
            .set_len(300_000)
            .unwrap();
        let mut back = vec![1u8; 1 << 20];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let err = unsafe { e.read(Bytes(0), &mut back) }.await.unwrap_err();
        assert_eq!(err.errno, libc::EIO, "{err}");
        assert!(err.msg.contains("is now 300000 bytes"), "{err}");
        let mut back = vec![1u8; 300_000];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(0), &mut back) }.await.unwrap();
        assert!(back[..777].iter().all(|&b| b == 0));
        assert!(back[777..300_000] == data[..300_000 - 777]);
    })
    .unwrap();
}
