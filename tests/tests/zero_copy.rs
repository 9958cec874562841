//! The zero-copy data path (ublk `UBLK_F_AUTO_BUF_REG`) below the front end, on the host:
//! tables built from text over real files, driven the way the ublk queue serves a request in
//! that mode: first as a fixed-buffer operation (`read_fixed`/`write_fixed`) on a buffer
//! registered with this thread's io_uring; where a layer answers `Served::NeedsMemory`, as a
//! kernel copy through mapped device bytes (`copy_mapped`, with a memfd standing in for
//! `/dev/ublkcN`); failing that, with `read`/`write` from memory. Every read is checked against
//! a byte model, and each table must take the path it promises to.

use std::path::Path;

use e2e::Rng;
use tables::buf::AlignedBuf;
use tables::io::{BlockDevice, FixedBuf, MappedCopy, Served};
use tables::registry::Resolver;
use tables::table::Table;
use tables::{Bytes, DeviceRef, WriteFlags};

/// Page-aligned memory registered as fixed buffer 0 of a runtime's ring.
struct Registered {
    mem: AlignedBuf,
}

impl Registered {
    fn new(len: usize) -> Registered {
        Registered {
            mem: AlignedBuf::page_aligned(len).unwrap(),
        }
    }
    fn bytes(&mut self) -> &mut [u8] {
        &mut self.mem
    }
    fn fixed(&self, len: usize) -> FixedBuf {
        FixedBuf {
            index: 0,
            base: self.mem.as_ptr() as u64,
            offset: 0,
            len,
        }
    }
}

/// How many requests took each path.
#[derive(Default, Debug)]
struct Paths {
    fixed_reads: usize,
    mapped_reads: usize,
    memory_reads: usize,
    fixed_writes: usize,
    mapped_writes: usize,
    memory_writes: usize,
}

/// The request's bytes as `/dev/ublkcN` shows them to the daemon: a memfd that kernel copies
/// (`pread`/`pwrite`) reach, for the `copy_mapped` step.
struct Request(std::fs::File);

impl Request {
    fn new() -> Request {
        // SAFETY: plain syscall; the name is a NUL-terminated literal.
        let fd = unsafe { libc::memfd_create(c"request".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a fresh descriptor we own.
        Request(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) })
    }
    /// The copy a device's mapping gets: `to_request` for a read's bytes.
    fn copy(
        &self,
        to_request: bool,
    ) -> impl Fn(*mut u8, usize, usize) -> tables::IoResult<()> + '_ {
        let fd = std::os::fd::AsRawFd::as_raw_fd(&self.0);
        move |p: *mut u8, at: usize, k: usize| {
            // SAFETY: called only through `MappedCopy::copy`, whose caller (a device) vouches
            // that `p..p + k` is its mapped memory; the kernel copies to or from it (EFAULT
            // if its pages are gone).
            let n = unsafe {
                if to_request {
                    libc::pwrite(fd, p.cast_const().cast(), k, at as i64)
                } else {
                    libc::pread(fd, p.cast(), k, at as i64)
                }
            };
            if n == k as isize {
                Ok(())
            } else {
                Err(tables::IoError::from(std::io::Error::last_os_error()))
            }
        }
    }
}

/// Writes `data` at `off` as the zero-copy queue does.
///
/// # Safety
/// The device may lend `data` to the kernel: the returned future must be completed or
/// dropped, never leaked, while `data` can go (`tables::io`'s lending contract).
async unsafe fn write(
    dev: &dyn BlockDevice,
    reg: &mut Registered,
    req: &Request,
    off: u64,
    data: &[u8],
    p: &mut Paths,
) {
    use std::os::unix::fs::FileExt;
    reg.bytes()[..data.len()].copy_from_slice(data);
    req.0.write_all_at(data, 0).unwrap();
    let fixed = reg.fixed(data.len());
    let flags = WriteFlags::default();
    let what = format!("{}: write at {off}+{}", dev.name(), data.len());
    if dev
        .write_fixed(Bytes(off), fixed, flags)
        .await
        .expect(&what)
        == Served::Done
    {
        p.fixed_writes += 1;
        return;
    }
    let copy = req.copy(false);
    let mapped = dev.copy_mapped(Bytes(off), data.len(), Some(flags), MappedCopy::new(&copy));
    if mapped.await.expect(&what) == Served::Done {
        p.mapped_writes += 1;
        return;
    }
    dev.write(Bytes(off), data, flags).await.expect(&what);
    p.memory_writes += 1;
}

/// Reads `len` bytes at `off` as the zero-copy queue does.
async fn read(
    dev: &dyn BlockDevice,
    reg: &mut Registered,
    req: &Request,
    off: u64,
    len: usize,
    p: &mut Paths,
) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    reg.bytes()[..len].fill(0xa5);
    let what = format!("{}: read at {off}+{len}", dev.name());
    if dev
        .read_fixed(Bytes(off), reg.fixed(len))
        .await
        .expect(&what)
        == Served::Done
    {
        p.fixed_reads += 1;
        return reg.bytes()[..len].to_vec();
    }
    req.0.write_all_at(&vec![0xa5; len], 0).unwrap();
    let copy = req.copy(true);
    if dev
        .copy_mapped(Bytes(off), len, None, MappedCopy::new(&copy))
        .await
        .expect(&what)
        == Served::Done
    {
        p.mapped_reads += 1;
        let mut v = vec![0u8; len];
        req.0.read_exact_at(&mut v, 0).unwrap();
        return v;
    }
    p.memory_reads += 1;
    let mut v = vec![0u8; len];
    // SAFETY: `v` belongs to this future and the read is awaited in it: completed, dropped
    // first (waiting for the kernel), or leaked with it.
    unsafe { dev.read(Bytes(off), &mut v) }.await.expect(&what);
    v
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    e2e::pseudo_random(len, seed)
}

/// Random 4 KiB-aligned writes and reads (4 KiB to 256 KiB) over `dev`, checked against a
/// model; returns which paths they took.
fn exercise(dev: &DeviceRef, model: &mut [u8], ops: usize, seed: u64) -> Paths {
    let rt = iort::Runtime::new(64).unwrap();
    let mut reg = Registered::new(256 << 10);
    let iov = libc::iovec {
        iov_base: reg.mem.as_mut_ptr().cast(),
        iov_len: reg.mem.len(),
    };
    // SAFETY: `reg` outlives `rt` (dropped after it, below).
    unsafe { rt.register_buffers(&[iov]) }.unwrap();
    let mut p = Paths::default();
    let req = Request::new();
    let mut rng = Rng(seed | 1);
    let blocks = model.len() as u64 / 4096;
    rt.block_on(async {
        for i in 0..ops {
            let n = (1 + rng.below(64)).min(blocks);
            let at = rng.below(blocks - n + 1) * 4096;
            let len = (n * 4096) as usize;
            let r = at as usize..at as usize + len;
            if rng.below(2) == 0 {
                let data = pattern(len, rng.next_u64());
                // SAFETY: awaited here, in block_on: completed or dropped before `data` goes.
                unsafe { write(&**dev, &mut reg, &req, at, &data, &mut p) }.await;
                model[r].copy_from_slice(&data);
            } else {
                let got = read(&**dev, &mut reg, &req, at, len, &mut p).await;
                assert!(
                    got == model[r],
                    "{}: op {i}: read at {at}+{len} differs from the model",
                    dev.name()
                );
            }
        }
        dev.flush().await.unwrap();
    });
    drop(rt);
    drop(reg);
    p
}

/// Builds `text` with the product's registry; `extra` names devices the table may use.
fn build(text: &str, extra: &[(&str, DeviceRef)]) -> DeviceRef {
    let reg = volmgr::registry();
    let files = extents::FileResolver::default();
    let named: Vec<(String, DeviceRef)> = extra
        .iter()
        .map(|(n, d)| (n.to_string(), d.clone()))
        .collect();
    let resolver = move |dev: &str| -> Result<DeviceRef, String> {
        if let Some((_, d)) = named.iter().find(|(n, _)| n == dev) {
            return Ok(d.clone());
        }
        files.open(dev)
    };
    let table = Table::parse(text, &reg).unwrap_or_else(|e| panic!("{text}: {e}"));
    // Pool opens run their I/O on a ring of their own thread.
    let dev = std::thread::scope(|s| {
        s.spawn(|| table.build(&reg, &resolver as &dyn Resolver))
            .join()
            .unwrap()
    });
    dev.unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn file(dir: &Path, name: &str, size: u64) -> String {
    let p = dir.join(name);
    e2e::sparse_file(&p, size).unwrap();
    p.display().to_string()
}

const MIB: u64 = 1 << 20;

/// Linear and striped tables over files on disk end in fixed-buffer file I/O for every
/// request; over files in RAM, in copies through the files' mappings.
#[test]
fn linear_and_striped_tables_take_the_fixed_path() {
    for dir in ["/var/tmp", "/dev/shm"] {
        linear_and_striped(dir);
    }
}

fn linear_and_striped(dir: &str) {
    let d = tempfile::tempdir_in(dir).unwrap();
    let (a, b, c) = (
        file(d.path(), "a", 8 * MIB),
        file(d.path(), "b", 12 * MIB),
        file(d.path(), "c", 8 * MIB),
    );
    if dir == "/dev/shm" {
        // Allocated, as the benchmarks' files are: holes of a file in RAM are read the plain
        // way (a mapped read would allocate them; the extents crate tests that).
        for (f, size) in [(&a, 8 * MIB), (&b, 12 * MIB), (&c, 8 * MIB)] {
            std::fs::write(f, vec![0u8; size as usize]).unwrap();
        }
    }
    // Two segments (a request may span both) and a striped segment.
    let text = format!(
        "0 8192 linear {a} 0\n8192 8192 linear {b} 2048\n16384 16384 striped 2 128 {c} 0 {b} 16384\n"
    );
    let dev = build(&text, &[]);
    let mut model = vec![0u8; dev.size().0 as usize];
    let p = exercise(&dev, &mut model, 400, 7);
    let (reads, writes) = if dir == "/dev/shm" {
        (p.mapped_reads, p.mapped_writes)
    } else {
        (p.fixed_reads, p.fixed_writes)
    };
    assert!(reads > 100 && writes > 100, "{dir}: {p:?}");
    assert_eq!((p.memory_reads, p.memory_writes), (0, 0), "{dir}: {p:?}");
}

/// raid1 reads and writes every copy from the registered buffer; raid5 reads a healthy
/// array from it but computes parity from memory, and reads a degraded one from memory.
#[test]
fn raid_mirrors_go_fixed_and_parity_writes_from_memory() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let legs: Vec<String> = (0..4)
        .map(|i| file(d.path(), &format!("l{i}"), 8 * MIB))
        .collect();
    let r1 = build(
        &format!(
            "0 16384 raid raid1 2 128 nosync 2 - {} - {}\n",
            legs[0], legs[1]
        ),
        &[],
    );
    let mut model = vec![0u8; r1.size().0 as usize];
    let p = exercise(&r1, &mut model, 300, 11);
    assert!(p.fixed_reads > 50 && p.fixed_writes > 50, "raid1 {p:?}");
    assert_eq!((p.memory_reads, p.memory_writes), (0, 0), "raid1 {p:?}");
    // Both legs hold what the model says.
    let l0 = std::fs::read(&legs[0]).unwrap();
    let l1 = std::fs::read(&legs[1]).unwrap();
    assert!(l0[..model.len()] == model[..] && l1[..model.len()] == model[..]);

    for l in &legs {
        std::fs::write(l, vec![0u8; 8 * MIB as usize]).unwrap();
    }
    let r5_text = format!(
        "0 49152 raid raid5_ls 2 128 nosync 4 - {} - {} - {} - {}\n",
        legs[0], legs[1], legs[2], legs[3]
    );
    let r5 = build(&r5_text, &[]);
    let mut model = vec![0u8; r5.size().0 as usize];
    let p = exercise(&r5, &mut model, 300, 13);
    assert!(p.fixed_reads > 50, "raid5 {p:?}");
    assert_eq!((p.memory_reads, p.fixed_writes), (0, 0), "raid5 {p:?}");
    // Degraded: the reads that land on the failed leg are rebuilt in memory.
    let rt = iort::Runtime::new(8).unwrap();
    rt.block_on(r5.message(&["fail".to_string(), "2".to_string()]))
        .unwrap();
    drop(rt);
    let p = exercise(&r5, &mut model, 300, 17);
    assert!(
        p.memory_reads > 10 && p.fixed_reads > 10,
        "raid5 degraded {p:?}"
    );
}

/// A thin volume writes new and exclusively owned blocks from the registered buffer; a
/// partial write to a block shared with a snapshot (copy-on-write) and a read of an
/// unprovisioned block (zeroes) go through memory. The snapshot keeps its content.
#[test]
fn thin_provisioning_goes_fixed_except_copy_on_write_and_zeroes() {
    let d = tempfile::tempdir_in("/var/tmp").unwrap();
    let meta = file(d.path(), "meta", 4 * MIB);
    let data = file(d.path(), "data", 64 * MIB);
    let pool = build(&format!("0 131072 thin-pool {meta} {data} 128 0\n"), &[]);
    let rt = iort::Runtime::new(8).unwrap();
    let msg = |words: &[&str]| {
        let w: Vec<String> = words.iter().map(|s| s.to_string()).collect();
        rt.block_on(pool.message(&w)).unwrap();
    };
    msg(&["create_thin", "0"]);
    let thin = build("0 32768 thin pool 0\n", &[("pool", pool.clone())]);
    let mut model = vec![0u8; thin.size().0 as usize];
    let p = exercise(&thin, &mut model, 300, 19);
    assert!(p.fixed_writes > 50, "thin {p:?}");
    assert!(p.memory_reads > 0 && p.fixed_reads > 0, "thin {p:?}");
    // Snapshot: every block is shared now; partial writes copy on write, in memory.
    msg(&["create_snap", "1", "0"]);
    let snap = build("0 32768 thin pool 1\n", &[("pool", pool.clone())]);
    let frozen = model.clone();
    let p = exercise(&thin, &mut model, 300, 23);
    assert!(p.memory_writes > 0, "thin after snapshot {p:?}");
    let mut snap_model = frozen;
    let p = exercise(&snap, &mut snap_model, 200, 29);
    assert!(p.fixed_reads > 0, "snapshot {p:?}");
    drop(rt);
}
