//! Crafted metadata that passes its checksums: starting from the metadata images of real
//! arrays, one field of one leg at a time is set to a hostile value (0, 1, huge, `u64::MAX`,
//! beyond the leg count...) and the checksum recomputed, then the array is assembled. It must
//! never panic or make a huge allocation: either it assembles (the damaged leg distrusted and
//! rebuilt, or trusted where the damage is harmless) with every byte of the data intact, or it
//! fails with an error that names the leg.

mod common;
use common::*;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use raid::meta::{self, SbRead, Superblock, META_BLOCK};
use raid::ppl::{self, Checkpoint};
use raid::LegState;
use tables::io::BlockDevice;
use tables::mem::MemDevice;
use tables::Sectors;

/// Records the largest single allocation, to catch sizes taken from disk unchecked.
struct Counting;
static LARGEST: AtomicUsize = AtomicUsize::new(0);
// SAFETY: forwards every call to the system allocator unchanged; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by `System` with layout `l` (see `alloc`).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        // SAFETY: as for `alloc`; `p` and `l` come from this allocator.
        unsafe { System.realloc(p, l, new) }
    }
}
#[global_allocator]
static ALLOC: Counting = Counting;

/// Larger than anything these small arrays need (a 16 MiB parity log segment at most).
const ALLOC_LIMIT: usize = 64 << 20;

/// The panic count is process-wide: the tests take turns so one's failure is not the other's.
static SERIAL: Mutex<()> = Mutex::new(());

const MIB: u64 = 1 << 20;
const META: u64 = 256 << 10;
const N: usize = 3;

/// Contents of every device of an array, to start each case from.
#[derive(Clone)]
struct Images {
    data: Vec<Vec<u8>>,
    meta: Vec<Vec<u8>>,
}

struct Array {
    head: &'static str,
    size: u64,
    model: Vec<u8>,
    images: Images,
    /// Legs that were failed when the images were taken.
    failed: Vec<usize>,
}

fn line(head: &str) -> String {
    let legs: Vec<String> = (0..N).map(|i| format!("m{i} d{i}")).collect();
    format!("{head} {N} {}", legs.join(" "))
}

fn devs_from(img: &Images) -> Devs {
    let devs = Devs::default();
    for i in 0..N {
        let d = Arc::new(MemDevice::new(format!("d{i}"), tables::Bytes(MIB)));
        d.fill(0, &img.data[i]);
        devs.add(&format!("d{i}"), d);
        let m = Arc::new(MemDevice::new(format!("m{i}"), tables::Bytes(META)));
        m.fill(0, &img.meta[i]);
        devs.add(&format!("m{i}"), m);
    }
    devs
}

fn snapshot(devs: &Devs) -> Images {
    let take = |name: String, len: u64| {
        let d = devs.open(&name).unwrap();
        rd(&*d, 0, len as usize).unwrap()
    };
    Images {
        data: (0..N).map(|i| take(format!("d{i}"), MIB)).collect(),
        meta: (0..N).map(|i| take(format!("m{i}"), META)).collect(),
    }
}

/// A real array: written whole, or (`fail`) with a leg failed before the last writes, so the
/// parity log holds entries.
fn make(head: &'static str, size: u64, fail: Option<usize>) -> Array {
    let blank = Images {
        data: vec![vec![0; MIB as usize]; N],
        meta: vec![vec![0; META as usize]; N],
    };
    let devs = devs_from(&blank);
    let dev = build(&devs, false, false, Sectors(size / 512), &line(head)).unwrap();
    sync_all(&dev);
    let mut model = pattern(11, size as usize);
    wr(&*dev, 0, &model).unwrap();
    flush(&*dev).unwrap();
    if let Some(f) = fail {
        iort::block_on(dev.fail_leg(f)).unwrap().unwrap();
        for (k, off) in [(12u64, 5000usize), (13, 70_000), (14, 300_001)] {
            let d = pattern(k, 9000);
            wr(&*dev, off as u64, &d).unwrap();
            model[off..off + d.len()].copy_from_slice(&d);
        }
    }
    drop(dev);
    Array {
        head,
        size,
        model,
        images: snapshot(&devs),
        failed: fail.into_iter().collect(),
    }
}

/// Assembles `a` from `img`, where the metadata of leg `leg` was damaged, and checks the
/// outcome; `what` names the damage.
fn assemble(a: &Array, img: &Images, leg: usize, what: &str) {
    let before = panics();
    let devs = devs_from(img);
    let r = build(&devs, false, false, Sectors(a.size / 512), &line(a.head));
    assert_eq!(panics(), before, "{what}: panicked");
    let dev = match r {
        Ok(d) => d,
        Err(e) => {
            let named = e.contains(&format!("leg {leg}"));
            assert!(named, "{what}: the error does not name leg {leg}: {e}");
            return;
        }
    };
    let states = dev.leg_states();
    for (i, s) in states.iter().enumerate() {
        if *s != LegState::InSync && !a.failed.contains(&i) {
            let why = dev.leg_errors()[i].clone().unwrap_or_default();
            assert!(why.contains(&format!("leg {i}")), "{what}: leg {i}: {why}");
        }
    }
    let size = a.size as usize;
    same(&rd(&*dev, 0, size).unwrap(), &a.model, what);
    iort::block_on(dev.sync_all()).unwrap().unwrap();
    same(&rd(&*dev, 0, size).unwrap(), &a.model, what);
    if a.failed.is_empty() {
        assert_eq!(dev.leg_states(), vec![LegState::InSync; N], "{what}");
        assert_eq!(check(&dev), 0, "{what}: mismatches after resync");
        flush(&*dev).unwrap();
        let st = dev.status();
        assert!(st.contains(" bitmap:0/"), "{what}: bitmap not clean: {st}");
    }
    assert_eq!(panics(), before, "{what}: panicked");
}

/// Every superblock field of leg `leg` set to hostile values, one at a time.
fn superblock_cases(a: &Array, leg: usize) {
    let SbRead::Valid(sb) = Superblock::decode(&a.images.meta[leg][..META_BLOCK]) else {
        panic!("leg {leg}: no superblock in the image");
    };
    let n = N as u32;
    type Edit = Box<dyn Fn(&mut Superblock)>;
    let mut edits: Vec<(String, Edit)> = Vec::new();
    for v in [0, 1, n, n + 1, 63, 64, u32::MAX] {
        edits.push((format!("leg_index={v}"), Box::new(move |s| s.leg_index = v)));
        edits.push((format!("legs={v}"), Box::new(move |s| s.legs = v)));
        edits.push((format!("level={v}"), Box::new(move |s| s.level = v)));
        edits.push((format!("layout={v}"), Box::new(move |s| s.layout = v)));
    }
    for v in [0, 1, 7, 1 << 40, u64::MAX / 512, u64::MAX] {
        edits.push((format!("chunk={v}"), Box::new(move |s| s.chunk_sectors = v)));
        edits.push((
            format!("region={v}"),
            Box::new(move |s| s.region_sectors = v),
        ));
        edits.push((format!("leg_bytes={v}"), Box::new(move |s| s.leg_bytes = v)));
    }
    let size = a.size;
    for v in [
        0,
        1,
        512,
        size - 512,
        size + 512,
        2 * size,
        1 << 40,
        u64::MAX / 512 * 512,
        u64::MAX,
    ] {
        edits.push((
            format!("array_bytes={v}"),
            Box::new(move |s| s.array_bytes = v),
        ));
    }
    for v in [0, 1, sb.events + 1, 1 << 62, u64::MAX - 1, u64::MAX] {
        edits.push((format!("events={v}"), Box::new(move |s| s.events = v)));
    }
    for v in [u64::MAX, 1 << 63, 1 << N, 1 << leg, 0b110, 0b011] {
        edits.push((
            format!("failed_mask={v:#x}"),
            Box::new(move |s| s.failed_mask = v),
        ));
    }
    for (name, e) in [
        (
            "uuid=0",
            Box::new(|s: &mut Superblock| s.uuid = [0; 16]) as Edit,
        ),
        (
            "uuid=ff",
            Box::new(|s: &mut Superblock| s.uuid = [0xff; 16]),
        ),
        ("data_id=0", Box::new(|s: &mut Superblock| s.data_id = 0)),
        ("clean", Box::new(|s: &mut Superblock| s.clean = !s.clean)),
        (
            "events+1,failed_mask=all others",
            Box::new(move |s: &mut Superblock| {
                s.events += 1;
                s.failed_mask = ((1u64 << N) - 1) & !(1 << leg);
            }),
        ),
    ] {
        edits.push((name.to_string(), e));
    }
    for (name, edit) in edits {
        let mut sb2 = sb.clone();
        edit(&mut sb2);
        let mut img = a.images.clone();
        img.meta[leg][..META_BLOCK].copy_from_slice(&sb2.encode());
        assemble(
            a,
            &img,
            leg,
            &format!("{} leg {leg} superblock {name}", a.head),
        );
    }
}

fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
/// crc32c of a 4 KiB block over all but its last 4 bytes, stored there (superblock, bitmap
/// page, checkpoint).
fn seal_block(b: &mut [u8]) {
    let crc = crc32c::crc32c(&b[..META_BLOCK - 4]);
    put_u32(b, META_BLOCK - 4, crc);
}

/// Bitmap page 0 of leg `leg`: wrong page index, every bit set (beyond the regions too).
fn bitmap_cases(a: &Array, leg: usize) {
    let at = META_BLOCK;
    type Edit = Box<dyn Fn(&mut [u8])>;
    let edits: Vec<(&str, Edit)> = vec![
        ("index=1", Box::new(|b| put_u32(b, 4, 1))),
        ("index=max", Box::new(|b| put_u32(b, 4, u32::MAX))),
        ("all bits", Box::new(|b| b[16..4080].fill(0xff))),
        ("magic only", Box::new(|b| b[4..4092].fill(0))),
    ];
    for (name, edit) in edits {
        let mut img = a.images.clone();
        let page = &mut img.meta[leg][at..at + META_BLOCK];
        edit(page);
        seal_block(page);
        assemble(a, &img, leg, &format!("{} leg {leg} bitmap {name}", a.head));
    }
}

/// Where the parity log's checkpoint is for these arrays (superblock + one bitmap page).
fn ppl_base(a: &Array) -> usize {
    let regions = (a.size / 2).div_ceil(32 << 10); // region_size 64 sectors, per leg
    meta::meta_bytes(regions) as usize
}

/// The leg holding the newest active checkpoint, and its offset.
fn log_leg(a: &Array) -> Option<(usize, Checkpoint)> {
    let base = ppl_base(a);
    (0..N)
        .filter_map(|i| {
            Checkpoint::decode(&a.images.meta[i][base..base + META_BLOCK]).map(|c| (i, c))
        })
        .filter(|(_, c)| c.active())
        .max_by_key(|(_, c)| c.max_gen())
}

fn checkpoint_cases(a: &Array) {
    let base = ppl_base(a);
    let Some((leg, cp)) = log_leg(a) else {
        panic!("{}: no active parity log in the image", a.head)
    };
    type Edit = Box<dyn Fn(&mut Checkpoint)>;
    let mut edits: Vec<(String, Edit)> = Vec::new();
    for v in [0, 1, 4095, 4096, 8192, META, 16 << 20, 1 << 40, u64::MAX] {
        edits.push((format!("seg_bytes={v}"), Box::new(move |c| c.seg_bytes = v)));
    }
    let cur = cp.gens.iter().position(|&g| g == cp.max_gen()).unwrap_or(0);
    for v in [1, 1 << 62, u64::MAX - 1, u64::MAX] {
        edits.push((
            format!("gen[{cur}]={v}"),
            Box::new(move |c| c.gens[cur] = v),
        ));
        edits.push((
            format!("gen[other]={v}"),
            Box::new(move |c| c.gens[(cur + 1) % ppl::SEGMENTS] = v),
        ));
    }
    edits.push(("key=0".into(), Box::new(move |c| c.keys[cur] = 0)));
    for (name, edit) in edits {
        let mut c = cp.clone();
        edit(&mut c);
        let mut img = a.images.clone();
        img.meta[leg][base..base + META_BLOCK].copy_from_slice(&c.encode());
        assemble(
            a,
            &img,
            leg,
            &format!("{} leg {leg} checkpoint {name}", a.head),
        );
    }
}

// Entry header layout (see raid/src/ppl.rs).
const E_SEQ: usize = 16;
const E_STRIPE: usize = 24;
const E_PLO: usize = 32;
const E_PLEN: usize = 40;
const E_K: usize = 48;
const E_NLOG: usize = 52;
const E_PP: usize = 80;
const E_SUM: usize = 96;
const E_RANGES: usize = 128;
const E_LOGGED: usize = 128 + 63 * 8;
const E_CRC: usize = 1020;

/// Recomputes an entry's payload sum (when its header describes a payload that fits) and
/// its header crc, so the damage passes both checks.
fn seal_entry(b: &mut [u8]) {
    let plen = get_u64(b, E_PLEN);
    let k = get_u32(b, E_K) as usize;
    let mut len = if get_u32(b, E_PP) != 0 { plen } else { 0 };
    for j in 0..(get_u32(b, E_NLOG) as usize).min(2) {
        let idx = get_u32(b, E_LOGGED + j * 4) as usize;
        if idx < k.min(63) {
            let lo = get_u32(b, E_RANGES + idx * 8) as u64;
            let hi = get_u32(b, E_RANGES + idx * 8 + 4) as u64;
            len = len.saturating_add(hi.saturating_sub(lo));
        }
    }
    let end = (META_BLOCK as u64).saturating_add(len);
    if end <= b.len() as u64 {
        let sum = ppl::payload_sum(get_u64(b, E_SEQ), &b[META_BLOCK..end as usize]);
        put_u64(b, E_SUM, sum);
    }
    let crc = crc32c::crc32c(&b[..E_CRC]);
    put_u32(b, E_CRC, crc);
}

fn entry_cases(a: &Array) {
    let Some((leg, cp)) = log_leg(a) else {
        panic!("{}: no active parity log in the image", a.head)
    };
    let base = ppl_base(a);
    let geo = ppl::Geometry {
        base: base as u64,
        seg_bytes: cp.seg_bytes,
    };
    let cur = cp.gens.iter().position(|&g| g == cp.max_gen()).unwrap_or(0);
    let seg = geo.seg_offset(cur) as usize;
    let meta_img = &a.images.meta[leg];
    let at = (seg..seg + cp.seg_bytes as usize)
        .step_by(META_BLOCK)
        .find(|&o| &meta_img[o..o + 8] == b"RPPLENT1")
        .expect("an entry in the current segment");
    let chunk = 4096u64;
    type Edit = Box<dyn Fn(&mut [u8])>;
    let mut edits: Vec<(String, Edit)> = Vec::new();
    for v in [0, 1, 1 << 62, u64::MAX - 1, u64::MAX] {
        edits.push((format!("seq={v}"), Box::new(move |b| put_u64(b, E_SEQ, v))));
        edits.push((
            format!("stripe={v}"),
            Box::new(move |b| put_u64(b, E_STRIPE, v)),
        ));
    }
    for v in [0, 1, chunk - 1, chunk, chunk + 1, u64::MAX] {
        edits.push((format!("plo={v}"), Box::new(move |b| put_u64(b, E_PLO, v))));
        edits.push((
            format!("plen={v}"),
            Box::new(move |b| put_u64(b, E_PLEN, v)),
        ));
    }
    for v in [0, 1, 2, 3, 63, 64, u32::MAX] {
        edits.push((format!("k={v}"), Box::new(move |b| put_u32(b, E_K, v))));
        edits.push((
            format!("nlog={v}"),
            Box::new(move |b| put_u32(b, E_NLOG, v)),
        ));
        edits.push((
            format!("logged[0]={v}"),
            Box::new(move |b| {
                put_u32(b, E_NLOG, 1);
                put_u32(b, E_LOGGED, v)
            }),
        ));
    }
    for (lo, hi) in [
        (0, 0),
        (1, 0),
        (0, chunk as u32 + 1),
        (0, u32::MAX),
        (u32::MAX, 0),
    ] {
        edits.push((
            format!("range[0]=({lo},{hi})"),
            Box::new(move |b| {
                put_u32(b, E_RANGES, lo);
                put_u32(b, E_RANGES + 4, hi)
            }),
        ));
    }
    edits.push(("pp flag".into(), Box::new(|b| put_u32(b, E_PP, 1))));
    for (name, edit) in edits {
        let mut img = a.images.clone();
        let b = &mut img.meta[leg][at..];
        edit(b);
        seal_entry(b);
        assemble(
            a,
            &img,
            leg,
            &format!("{} leg {leg} log entry {name}", a.head),
        );
    }
}

#[test]
fn crafted_superblocks_and_bitmaps_never_panic_and_keep_the_data() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for a in [
        make("raid5_ls 3 8 region_size 64", 2 * MIB, None),
        make("raid1 3 0 region_size 64", MIB, None),
        make("raid10 3 8 region_size 64", MIB + MIB / 2, None),
    ] {
        for leg in [0, N - 1] {
            superblock_cases(&a, leg);
            bitmap_cases(&a, leg);
        }
    }
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < ALLOC_LIMIT, "an allocation of {largest} bytes");
}

#[test]
fn crafted_parity_logs_never_panic_and_keep_the_data() {
    let _turn = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let a = make("raid5_ls 3 8 region_size 64", 2 * MIB, Some(2));
    checkpoint_cases(&a);
    entry_cases(&a);
    superblock_cases(&a, 0);
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < ALLOC_LIMIT, "an allocation of {largest} bytes");
}
