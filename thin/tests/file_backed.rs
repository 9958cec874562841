//! The pool on real files through io_uring (iort): built from table lines through the
//! registry (the open runs on a helper thread with its own ring), written from two I/O
//! threads, committed by the background thread and by flushes, reopened from the files,
//! checked.

mod common;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use common::*;
use tables::io::{BlockDevice, IoFuture};
use tables::registry::{BuildCtx, Registry};
use tables::{Bytes, DeviceRef, IoError, IoResult, WriteFlags};
use thin::{tools, ThinId};

/// A minimal file-backed device over iort (no O_DIRECT; enough for the contract).
struct FileDev {
    f: std::fs::File,
    size: Bytes,
    name: String,
}

impl FileDev {
    fn open(path: &std::path::Path, size: u64) -> Arc<FileDev> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap();
        f.set_len(size).unwrap();
        Arc::new(FileDev {
            f,
            size: Bytes(size),
            name: path.display().to_string(),
        })
    }
    /// Writes all of `buf` at `off`.
    ///
    /// # Safety
    /// The kernel reads `buf` until each write completes: the lending contract
    /// (`tables::io`) holds for the returned future.
    async unsafe fn rw(&self, off: u64, buf: &[u8], flags: i32) -> IoResult<()> {
        let mut done = 0;
        while done < buf.len() {
            let n =
                iort::write_at(self.f.as_raw_fd(), &buf[done..], off + done as u64, flags).await?;
            if n == 0 {
                return Err(IoError::eio("short write"));
            }
            done += n;
        }
        Ok(())
    }
}

impl BlockDevice for FileDev {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            tables::io::check_range(&self.name, self.size, offset, Bytes(buf.len() as u64))?;
            let mut done = 0;
            while done < buf.len() {
                let n = iort::read_at(self.f.as_raw_fd(), &mut buf[done..], offset.0 + done as u64)
                    .await?;
                if n == 0 {
                    buf[done..].fill(0);
                    break;
                }
                done += n;
            }
            Ok(())
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        Box::pin(async move {
            tables::io::check_range(&self.name, self.size, offset, Bytes(buf.len() as u64))?;
            self.rw(offset.0, buf, if flags.fua { libc::RWF_DSYNC } else { 0 })
                .await
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move { Ok(iort::fsync(self.f.as_raw_fd(), true).await?) })
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        Box::pin(async move {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            Ok(iort::fallocate(self.f.as_raw_fd(), mode, offset.0, len.0).await?)
        })
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, _f: WriteFlags) -> IoFuture<'_> {
        Box::pin(async move {
            Ok(iort::fallocate(
                self.f.as_raw_fd(),
                libc::FALLOC_FL_ZERO_RANGE,
                offset.0,
                len.0,
            )
            .await?)
        })
    }
}

#[test]
fn pool_on_files_through_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let mp = dir.path().join("meta");
    let dp = dir.path().join("data");
    let meta: DeviceRef = FileDev::open(&mp, 4 * MIB);
    let data: DeviceRef = FileDev::open(&dp, 64 * MIB);
    let mut reg = Registry::empty();
    thin::register(&mut reg);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let pool_dev: std::sync::Mutex<Option<DeviceRef>> = std::sync::Mutex::new(None);
    let resolver = |n: &str| -> Result<DeviceRef, String> {
        match n {
            "meta" => Ok(meta.clone()),
            "data" => Ok(data.clone()),
            "pool" => pool_dev.lock().unwrap().clone().ok_or("no pool".into()),
            _ => Err(format!("no {n}")),
        }
    };
    let ctx = BuildCtx {
        line: 1,
        len: tables::Sectors(131072),
        resolver: &resolver,
    };
    let pdev = reg
        .get("thin-pool")
        .unwrap()
        .build(&ctx, &s(&["meta", "data", "128", "16"]))
        .unwrap();
    *pool_dev.lock().unwrap() = Some(pdev.clone());
    run(async {
        pdev.message(&s(&["create_thin", "1"])).await.unwrap();
        pdev.message(&s(&["create_thin", "2"])).await.unwrap();
    });
    let tctx = BuildCtx {
        line: 2,
        len: tables::Sectors(65536),
        resolver: &resolver,
    };
    let t1 = reg
        .get("thin")
        .unwrap()
        .build(&tctx, &s(&["pool", "1"]))
        .unwrap();
    let t2 = reg
        .get("thin")
        .unwrap()
        .build(&tctx, &s(&["pool", "2"]))
        .unwrap();
    // Two I/O threads, each on its own ring.
    let hs: Vec<_> = [(t1.clone(), 1u8), (t2.clone(), 2u8)]
        .into_iter()
        .map(|(t, v)| {
            std::thread::spawn(move || {
                iort::block_on(async {
                    for i in 0..200u64 {
                        let off = (i * 7919 % 512) * 65536 + (i % 3) * 4096;
                        // SAFETY: awaited here, in block_on: completed or dropped before the buffer
                        // goes.
                        unsafe {
                            t.write(
                                Bytes(off),
                                &[v.wrapping_add(i as u8); 8192],
                                WriteFlags::default(),
                            )
                        }
                        .await
                        .unwrap();
                    }
                })
                .unwrap();
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    // The background commit (1 s for table-built pools) runs on its own thread.
    let before = thin::target::find_pool(&pdev).unwrap().stats().commits;
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let after = thin::target::find_pool(&pdev).unwrap().stats().commits;
    assert!(after > before, "no background commit ({before} -> {after})");
    run(async {
        pdev.message(&s(&["create_snap", "3", "1"])).await.unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t1.write(Bytes(0), &[0xAB; 4096], WriteFlags::FUA) }
            .await
            .unwrap();
    });
    let expect = |v: u8, i: u64| v.wrapping_add(i as u8);
    drop((t1, t2, pdev));
    *pool_dev.lock().unwrap() = None;
    // Reopen from the files.
    let r = run(tools::check(&meta)).unwrap();
    assert!(r.clean, "{:?}", r.errors);
    assert_eq!(r.devices, 3);
    let pool = open(meta.clone(), data.clone(), opts(128));
    run(async {
        for (id, v) in [(1u32, 1u8), (2, 2), (3, 1)] {
            let t = pool.thin(ThinId(id), Bytes(32 * MIB), None).unwrap();
            let mut last = std::collections::HashMap::new();
            for i in 0..200u64 {
                let off = (i * 7919 % 512) * 65536 + (i % 3) * 4096;
                for k in 0..2 {
                    last.insert(off + k * 4096, expect(v, i));
                }
            }
            for (off, want) in last {
                let mut b = vec![0u8; 4096];
                // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
                unsafe { t.read(Bytes(off), &mut b) }.await.unwrap();
                let want = if id == 1 && off == 0 { 0xAB } else { want };
                assert!(b.iter().all(|&x| x == want), "thin {id} at {off}");
            }
        }
    });
}
