//! The block-device path, on loop devices (`losetup`): size and block sizes from ioctls,
//! discard, write-zeroes, the resolver's `major:minor` form, and a failing device.
//!
//! These need root and util-linux; without them they fail loudly rather than pass.

mod common;

use std::os::unix::fs::FileTypeExt;
use std::sync::Arc;

use common::{pattern, st_blocks, LoopDev, TestBuf};
use extents::{create_sparse, ExtentKind, FileExtent, FileResolver, IoMode, OpenOptions};
use tables::io::read_blocking;
use tables::registry::Resolver;
use tables::{BlockDevice, Bytes, WriteFlags};

const SIZE: u64 = 16 << 20;

#[test]
fn loop_device_extent() {
    let d = common::direct_dir();
    let backing = d.path().join("backing.img");
    create_sparse(&backing, Bytes(SIZE)).unwrap();
    let lo = LoopDev::attach(&backing);
    assert!(std::fs::metadata(&lo.dev)
        .unwrap()
        .file_type()
        .is_block_device());

    // Through the resolver: the extent holds the device exclusively, so the resolver's other
    // names for it below must come back to this same extent.
    let r = FileResolver::default();
    let e = r.open_extent(lo.dev.to_str().unwrap()).unwrap();
    let (major, minor) = match e.kind() {
        ExtentKind::BlockDevice { major, minor } => (major, minor),
        k => panic!("{} should be a block device, got {k:?}", lo.dev.display()),
    };
    assert_eq!(major, 7, "loop devices have major 7");
    assert_eq!(e.size(), Bytes(SIZE), "BLKGETSIZE64");
    let l = e.limits();
    assert_eq!(l.logical_block_size, 512, "BLKSSZGET");
    assert!(l.physical_block_size >= 512, "BLKPBSZGET");
    assert!(l.discard_granularity > 0, "loop over ext4 discards");
    assert!(
        !l.discard_zeroes,
        "a block device does not promise zeroes after discard"
    );
    assert!(
        matches!(e.io_mode(), IoMode::Direct { .. }),
        "{:?}",
        e.io_mode()
    );
    assert!(e.status().starts_with("blockdev 7:"), "{}", e.status());

    // The resolver finds it by device number (how dmsetup prints devices), sharing the extent
    // with the path form.
    let by_path = r.open_extent(lo.dev.to_str().unwrap()).unwrap();
    let by_num = r.open_extent(&format!("{major}:{minor}")).unwrap();
    assert!(Arc::ptr_eq(&by_path, &by_num));
    assert_eq!(by_num.size(), Bytes(SIZE));
    drop((by_path, by_num));

    iort::block_on(async {
        // Aligned and unaligned data round-trips.
        let data = TestBuf::filled(&pattern(10, 4 << 20), 0);
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.write(Bytes(0), data.as_ref(), WriteFlags::default()) }
            .await
            .unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.write(Bytes(5_000_001), &pattern(11, 12_345), WriteFlags::FUA) }
            .await
            .unwrap();
        e.flush().await.unwrap();
        let mut back = TestBuf::new(4 << 20, 0);
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(0), back.as_mut()) }.await.unwrap();
        assert!(back.as_ref() == data.as_ref());
        let mut odd = vec![0u8; 12_345];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(5_000_001), &mut odd) }.await.unwrap();
        assert_eq!(odd, pattern(11, 12_345));

        // Write-zeroes (unaligned edges written, middle zeroed by the kernel).
        e.write_zeroes(Bytes(1000), Bytes(1 << 20), WriteFlags::default())
            .await
            .unwrap();
        let mut back = vec![1u8; 2 << 20];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(0), &mut back) }.await.unwrap();
        let src = data.as_ref();
        assert_eq!(back[..1000], src[..1000]);
        assert!(back[1000..1000 + (1 << 20)].iter().all(|&b| b == 0));
        assert_eq!(back[1000 + (1 << 20)..], src[1000 + (1 << 20)..2 << 20]);
    })
    .unwrap();

    // Discard reaches the backing file as a punched hole.
    let before = st_blocks(&backing);
    iort::block_on(async {
        e.discard(Bytes(2 << 20), Bytes(2 << 20)).await.unwrap();
        // Unaligned: only whole blocks inside are discarded, and nothing outside is touched.
        e.discard(Bytes(100), Bytes(700)).await.unwrap();
        e.flush().await.unwrap();
        let mut b = vec![0u8; 512];
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { e.read(Bytes(0), &mut b) }.await.unwrap();
        assert_eq!(b[..], data_prefix()[..]);
    })
    .unwrap();
    let after = st_blocks(&backing);
    assert!(
        after + 3000 <= before,
        "discard of 2 MiB must punch the backing file: {before} -> {after}"
    );

    // Out of range names the device.
    let err = read_blocking(&*e, Bytes(SIZE), &mut [0u8; 512]).unwrap_err();
    assert_eq!(err.errno, libc::ENOSPC);
    assert!(err.msg.contains(lo.dev.to_str().unwrap()), "{err}");
}

fn data_prefix() -> Vec<u8> {
    pattern(10, 512)
}

#[test]
fn failing_block_device_returns_errors_not_panics() {
    // A loop device whose backing file lives on a 256 KiB tmpfs: writes beyond what the tmpfs
    // can hold fail inside the loop driver and come back as an I/O error from the device.
    let fs = common::SmallTmpfs::mount("256k");
    let backing = fs.path().join("backing.img");
    create_sparse(&backing, Bytes(SIZE)).unwrap();
    let lo = LoopDev::attach(&backing);
    let e = FileExtent::open(&lo.dev, OpenOptions::default()).unwrap();
    let name = lo.dev.to_str().unwrap().to_string();
    let res = iort::block_on(async {
        let buf = TestBuf::filled(&vec![0xabu8; 1 << 20], 0);
        let mut first_err = None;
        for i in 0..8u64 {
            if let Err(err) =
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { e.write(Bytes(i << 20), buf.as_ref(), WriteFlags::default()) }.await
            {
                first_err = Some(err);
                break;
            }
        }
        if first_err.is_none() {
            first_err = e.flush().await.err();
        }
        first_err
    })
    .unwrap();
    let err = res.expect("writing 8 MiB through a 256 KiB tmpfs must fail somewhere");
    assert!(
        err.errno == libc::EIO || err.errno == libc::ENOSPC,
        "unexpected errno {}: {err}",
        err.errno
    );
    let s = err.to_string();
    assert!(s.contains(&name), "{s}");
    assert!(s.contains("at byte") || s.contains("fdatasync"), "{s}");
    eprintln!("failing device reported: {s}");
}

/// Block devices are claimed `O_EXCL`: a mounted one is refused with EBUSY naming it unless
/// forced; unmounted it opens, and then nobody else (another extent not shared through the
/// resolver, or `mount`) can claim it. Regular files are not claimed.
#[test]
fn block_devices_are_opened_exclusively() {
    let d = common::direct_dir();
    let backing = d.path().join("fs.img");
    create_sparse(&backing, Bytes(SIZE)).unwrap();
    let lo = LoopDev::attach(&backing);
    let dev = lo.dev.to_str().unwrap().to_string();
    common::mkfs_ext4(&lo.dev);
    let mnt = common::Mount::new(&lo.dev, d.path().join("mnt"));

    let err = FileExtent::open(&lo.dev, OpenOptions::default()).unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    let s = err.to_string();
    assert!(s.contains(&dev) && s.contains("mounted"), "{s}");
    let read_only = OpenOptions {
        read_only: true,
        ..OpenOptions::default()
    };
    let err = FileExtent::open(&lo.dev, read_only).unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY, "read-only is claimed too: {err}");
    let err = FileResolver::default().open(&dev).err().unwrap();
    assert!(err.contains(&dev) && err.contains("mounted"), "{err}");

    // Forced: opens, and reads the file system's superblock magic (0xEF53 at 1080).
    let forced = OpenOptions {
        exclusive: false,
        ..OpenOptions::default()
    };
    let shared = FileExtent::open(&lo.dev, forced).unwrap();
    let mut sb = TestBuf::new(4096, 0);
    read_blocking(&shared, Bytes(0), sb.as_mut()).unwrap();
    assert_eq!(sb.as_ref()[1080..1082], [0x53, 0xef]);
    drop(shared);

    drop(mnt);
    let e = FileExtent::open(&lo.dev, OpenOptions::default()).unwrap();
    // Held by us: a second exclusive opener is refused; a shared one still opens.
    let err = FileExtent::open(&lo.dev, OpenOptions::default()).unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    FileExtent::open(&lo.dev, forced).unwrap();
    let mnt_dir = d.path().join("mnt2");
    std::fs::create_dir(&mnt_dir).unwrap();
    let st = std::process::Command::new("mount")
        .arg(&lo.dev)
        .arg(&mnt_dir)
        .stderr(std::process::Stdio::null())
        .status()
        .expect("mount must be available");
    assert!(
        !st.success(),
        "mount must fail while the extent holds the device"
    );
    drop(e);
    FileExtent::open(&lo.dev, OpenOptions::default()).unwrap();

    // A regular file is never claimed: two extents on one file open side by side.
    let _a = FileExtent::open(&backing, OpenOptions::default()).unwrap();
    let _b = FileExtent::open(&backing, OpenOptions::default()).unwrap();
}
