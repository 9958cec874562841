//! Crafted metadata: one on-disk field at a time is set to a hostile value (0, 1, huge,
//! u64::MAX, out-of-range block numbers, cycles: a child pointing at itself, its parent or
//! the superblock, a pointer into another structure) and the block's crc32c is recomputed,
//! so the damage gets past the checksum (which is all `corrupt.rs`'s bit flips exercise).
//! Then `Pool::open` (and I/O on the pool if it opens), `tools::check`, `tools::dump` and
//! `tools::repair` must never panic, never make a huge allocation and never hang, and damage
//! must be refused with an error naming the block (or reported by `check` as not clean).
//!
//! By default a sample of nodes of every tree is damaged (the roots, an internal node, the
//! first and last leaf, every bitmap); `THIN_CRAFTED_ALL=1` damages every live block.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::*;
use tables::io::BlockDevice;
use tables::mem::MemDevice;
use tables::{Bytes, DeviceRef, WriteFlags};
use thin::disk::bitmap::{BITMAP_MAGIC, PER_BITMAP};
use thin::disk::node::{capacity, Node, TreeKind};
use thin::disk::superblock::Superblock;
use thin::disk::{seal, HEADER_LEN};
use thin::{tools, MetaBlock, Pool, ThinId};

/// Largest single allocation seen since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);
/// Allocations above this are refused outright (the process aborts with "memory
/// allocation of N bytes failed"), so a space map sized from a crafted count cannot make the
/// machine swap before the per-case check below sees it.
const REFUSE: usize = 1 << 30;
/// Largest allocation one case may make: the legitimate maximum here is the space map of a
/// superblock whose data block count is as large as this metadata device can describe
/// (512 blocks * 4064 counts, 4 bytes each while recounting, ~8 MiB).
const CASE_LIMIT: usize = 16 << 20;

struct Tracking;

// SAFETY: every method forwards to `System` with the caller's layout and pointer unchanged;
// refusing an allocation by returning null is allowed by the `GlobalAlloc` contract.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        if l.size() > REFUSE {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout as given to us.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        if l.size() > REFUSE {
            return std::ptr::null_mut();
        }
        // SAFETY: same layout as given to us.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` was allocated by `System` with `l` (we never hand out anything else).
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        if new > REFUSE {
            return std::ptr::null_mut();
        }
        // SAFETY: `p` was allocated by `System` with `l`.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

const META: u64 = 2 * MIB;
const DATA: u64 = 16 * MIB;
const BS: u64 = 4096;

/// A pool whose metadata has every structure: a two-level device tree (260 snapshots), a
/// count in the overflow tree, a two-level mapping tree, bitmaps, and a held metadata
/// snapshot that later writes diverge from.
fn build() -> Arc<MemDevice> {
    let meta = mem("meta", META);
    let data = mem("data", DATA);
    let pool = open(meta.clone(), data, opts(8));
    run(async {
        pool.create_thin(ThinId(0)).unwrap();
        let t = pool.thin(ThinId(0), Bytes(MIB), None).unwrap();
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        unsafe { t.write(Bytes(0), &[1u8; 4096], WriteFlags::default()) }
            .await
            .unwrap();
        // Each snapshot diverges from the origin's one leaf: the shared block's count
        // passes 255, into the overflow tree.
        for i in 1..=260u32 {
            pool.create_snap(ThinId(i), ThinId(0)).await.unwrap();
            let s = pool.thin(ThinId(i), Bytes(MIB), None).unwrap();
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { s.write(Bytes(4096), &[2u8; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.create_thin(ThinId(1000)).unwrap();
        let t = pool.thin(ThinId(1000), Bytes(DATA), None).unwrap();
        let mut s = 1u64;
        for i in 0..1200u64 {
            let b = rng(&mut s) % (DATA / BS);
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { t.write(Bytes(b * BS), &[i as u8; 512], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.create_snap(ThinId(1001), ThinId(1000)).await.unwrap();
        pool.create_thin(ThinId(2000)).unwrap();
        let u = pool.thin(ThinId(2000), Bytes(MIB), None).unwrap();
        for i in 0..10u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { u.write(Bytes(i * BS), &[4; 512], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.commit().await.unwrap();
        let m = thin::pool::pool_message(&pool, &["reserve_metadata_snap".to_string()]).await;
        m.unwrap();
        // After the reserve, blocks only the held snapshot still maps: the overwritten ones
        // of 2000, and the one 260 had to itself.
        for i in 0..10u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe { u.write(Bytes(i * BS), &[5; 4096], WriteFlags::default()) }
                .await
                .unwrap();
        }
        pool.delete(ThinId(260)).unwrap();
        for i in 0..100u64 {
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            unsafe {
                t.write(
                    Bytes((i * 37 % 4096) * BS),
                    &[3; 512],
                    WriteFlags::default(),
                )
            }
            .await
            .unwrap();
        }
        pool.commit().await.unwrap();
    });
    meta
}

fn copy(src: &MemDevice) -> Arc<MemDevice> {
    copy_mem("meta-copy", src, META)
}

fn block(dev: &MemDevice, b: u64) -> Vec<u8> {
    dev.snapshot(b * 4096, 4096)
}

/// A live node found by walking the trees.
struct Site {
    block: u64,
    kind: TreeKind,
    /// The block that references it (0: the superblock).
    parent: u64,
    node: Node,
    root: bool,
}

/// Every node (once) and every bitmap (block, number) of valid metadata.
fn walk(dev: &MemDevice, sb: &Superblock) -> (Vec<Site>, Vec<(u64, u64)>) {
    let mut sites = Vec::new();
    let mut bitmaps = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![
        (sb.device_root.0, TreeKind::Devices, 0u64),
        (sb.sm_index_root.0, TreeKind::SmIndex, 0),
        (sb.overflow_root.0, TreeKind::Overflow, 0),
        (sb.held_root.0, TreeKind::Devices, 0),
    ];
    while let Some((b, kind, parent)) = stack.pop() {
        if b == 0 || !seen.insert(b) {
            continue;
        }
        let node = Node::unpack(&block(dev, b), MetaBlock(b), kind).unwrap();
        if node.is_leaf() {
            for i in 0..node.len() {
                match kind {
                    TreeKind::Devices => stack.push((node.val(i)[0], TreeKind::Mapping, b)),
                    TreeKind::SmIndex => bitmaps.push((node.vals[i], node.keys[i])),
                    _ => {}
                }
            }
        } else {
            for i in 0..node.len() {
                stack.push((node.vals[i], kind, b));
            }
        }
        let root = parent == 0
            || kind == TreeKind::Mapping && {
                let p = sites.iter().find(|s: &&Site| s.block == parent);
                p.is_some_and(|p| p.kind == TreeKind::Devices)
            };
        sites.push(Site {
            block: b,
            kind,
            parent,
            node,
            root,
        });
    }
    (sites, bitmaps)
}

/// One crafted change: `bytes` written at `off` in `block`, then the block resealed.
struct Case {
    block: u64,
    what: String,
    off: usize,
    bytes: Vec<u8>,
    /// `check` must refuse it or report it as not clean.
    must_detect: bool,
    /// `check` must refuse it with an error naming `block` itself.
    local: bool,
    /// `Pool::open` must refuse it (a valid value that contradicts the table or devices).
    open_must_fail: bool,
}

fn case(block: u64, what: String, off: usize, bytes: Vec<u8>, detect: bool, local: bool) -> Case {
    Case {
        block,
        what,
        off,
        bytes,
        must_detect: detect,
        local: local && detect,
        open_must_fail: false,
    }
}

fn superblock_cases(sb: &Superblock, sites: &[Site], cases: &mut Vec<Case>) {
    let u32s = |off: usize, name: &str, vals: &[u32], cases: &mut Vec<Case>| {
        for &v in vals {
            let what = format!("superblock {name} = {v}");
            cases.push(case(0, what, off, v.to_le_bytes().to_vec(), true, true));
        }
    };
    let u64s = |off: usize, name: &str, vals: &[u64], detect: bool, cases: &mut Vec<Case>| {
        for &v in vals {
            let what = format!("superblock {name} = {v}");
            cases.push(case(0, what, off, v.to_le_bytes().to_vec(), detect, true));
        }
    };
    let nm = sb.nr_meta_blocks;
    let nd = sb.nr_data_blocks;
    u32s(16, "version", &[0, 2, u32::MAX], cases);
    u32s(20, "metadata block size", &[0, 512, 8192, u32::MAX], cases);
    u32s(
        24,
        "data block size",
        &[0, 1, 7, 9, 4 << 20, u32::MAX],
        cases,
    );
    // A valid block size that is not the table's.
    let mut c = case(
        0,
        "superblock data block size = 16".into(),
        24,
        16u32.to_le_bytes().to_vec(),
        false,
        false,
    );
    c.open_must_fail = true;
    cases.push(c);
    let huge = [1u64 << 32, (1 << 32) + 1, 1 << 40, u64::MAX];
    // Fewer data blocks than are mapped: the leaf that maps beyond them is named.
    for v in [0u64, 1] {
        let what = format!("superblock nr_data_blocks = {v}");
        cases.push(case(0, what, 32, v.to_le_bytes().to_vec(), true, false));
    }
    u64s(32, "nr_data_blocks", &huge, true, cases);
    u64s(32, "nr_data_blocks", &[nd - 1], false, cases);
    // More blocks than the data device holds: fine for check, refused by open.
    let mut c = case(
        0,
        format!("superblock nr_data_blocks = {}", nd + 1),
        32,
        (nd + 1).to_le_bytes().to_vec(),
        false,
        false,
    );
    c.open_must_fail = true;
    cases.push(c);
    // Describable by this metadata device, but far beyond the data device.
    let mut c = case(
        0,
        "superblock nr_data_blocks = 500000".into(),
        32,
        500_000u64.to_le_bytes().to_vec(),
        false,
        false,
    );
    c.open_must_fail = true;
    cases.push(c);
    u64s(
        40,
        "nr_metadata_blocks",
        &[0, 1, 2, 63, nm + 1],
        true,
        cases,
    );
    u64s(40, "nr_metadata_blocks", &huge, true, cases);
    u64s(40, "nr_metadata_blocks", &[64, nm - 1], false, cases);
    u64s(48, "transaction id", &[0, u64::MAX], false, cases);
    u64s(56, "generation", &[0, u64::MAX], false, cases);
    let roots = [
        (64, "device tree root", sb.device_root.0),
        (72, "space map index root", sb.sm_index_root.0),
        (80, "overflow tree root", sb.overflow_root.0),
    ];
    let leaf = sites
        .iter()
        .find(|s| s.kind == TreeKind::Mapping && s.node.is_leaf())
        .map(|s| s.block)
        .unwrap();
    for (off, name, own) in roots {
        let mut vals = vec![0, nm, nm + 7, u64::MAX, leaf];
        vals.extend(roots.iter().map(|r| r.2).filter(|&r| r != own));
        u64s(off, name, &vals, true, cases);
    }
    u64s(
        88,
        "held root",
        &[nm, u64::MAX, sb.sm_index_root.0, leaf],
        true,
        cases,
    );
    // Dropping the held snapshot leaks what only it mapped: found, not refused.
    let what = "superblock held root = 0".to_string();
    cases.push(case(0, what, 88, 0u64.to_le_bytes().to_vec(), true, false));
}

fn node_cases(s: &Site, sb: &Superblock, bitmaps: &[(u64, u64)], cases: &mut Vec<Case>) {
    let b = s.block;
    let n = &s.node;
    let name = format!("{:?} node {b} (level {})", s.kind, n.level);
    let w = n.words();
    let cap = capacity(w);
    let nm = sb.nr_meta_blocks;
    let nd = sb.nr_data_blocks;
    let u64_at = |off: usize, what: String, v: u64, detect: bool, local: bool| {
        case(b, what, off, v.to_le_bytes().to_vec(), detect, local)
    };
    // Header: nr_entries, value_words, level.
    for v in [0u32, 1, cap as u32, cap as u32 + 1, u32::MAX] {
        let detect = v as usize > cap || (v == 0 && !n.is_leaf());
        cases.push(case(
            b,
            format!("{name}: nr_entries = {v}"),
            16,
            v.to_le_bytes().to_vec(),
            detect,
            true,
        ));
    }
    for v in [0u8, 1, 2, 3, 255] {
        if v as usize != w {
            cases.push(case(
                b,
                format!("{name}: value_words = {v}"),
                20,
                vec![v],
                true,
                true,
            ));
        }
    }
    let mut levels = vec![n.level + 1, 16, 17, 255];
    if n.level > 0 {
        levels.push(n.level - 1);
        levels.push(0);
    }
    for v in levels {
        // An internal node read as a leaf of a one-word tree is well-formed: its children
        // become mappings or counts, which the recount catches elsewhere.
        let local = !(v == 0 && w == 1 && s.kind.leaf_words() == 1);
        cases.push(case(
            b,
            format!("{name}: level = {v}"),
            21,
            vec![v],
            true,
            local,
        ));
    }
    let key = |i: usize| 32 + 8 * i;
    let val = |i: usize, word: usize| 32 + 8 * cap + 8 * (i * w + word);
    if n.len() >= 2 {
        let last = n.len() - 1;
        cases.push(u64_at(
            key(0),
            format!("{name}: key 0 = u64::MAX"),
            u64::MAX,
            true,
            true,
        ));
        cases.push(u64_at(
            key(last),
            format!("{name}: last key = 0"),
            0,
            true,
            true,
        ));
        let mid = n.len() / 2;
        let prev = n.keys[mid - 1];
        cases.push(u64_at(
            key(mid),
            format!("{name}: key {mid} = key {}", mid - 1),
            prev,
            true,
            true,
        ));
    }
    if n.is_empty() {
        return;
    }
    let entries: Vec<usize> = if n.len() > 1 {
        vec![0, n.len() - 1]
    } else {
        vec![0]
    };
    let mut others: Vec<u64> = vec![sb.device_root.0, sb.sm_index_root.0, sb.overflow_root.0];
    others.extend(bitmaps.first().map(|b| b.0));
    others.retain(|&o| o != b);
    for i in entries {
        let e = format!("{name}: entry {i}");
        if !n.is_leaf() || s.kind == TreeKind::Devices || s.kind == TreeKind::SmIndex {
            // A metadata block pointer: a child, a mapping root, a bitmap.
            let what = if n.is_leaf() { "pointer" } else { "child" };
            for v in [0, nm, nm + 3, u64::MAX] {
                cases.push(u64_at(
                    val(i, 0),
                    format!("{e} {what} = {v}"),
                    v,
                    true,
                    true,
                ));
            }
            cases.push(u64_at(
                val(i, 0),
                format!("{e} {what} = itself (cycle)"),
                b,
                true,
                true,
            ));
            if s.parent != 0 {
                let p = s.parent;
                cases.push(u64_at(
                    val(i, 0),
                    format!("{e} {what} = its parent {p} (cycle)"),
                    p,
                    true,
                    true,
                ));
            }
            for &o in &others {
                cases.push(u64_at(
                    val(i, 0),
                    format!("{e} {what} = block {o} (another structure)"),
                    o,
                    true,
                    true,
                ));
            }
        }
        if n.is_leaf() {
            match s.kind {
                TreeKind::Mapping => {
                    for v in [nd, nd + 1, u64::MAX] {
                        cases.push(u64_at(
                            val(i, 0),
                            format!("{e} data block = {v}"),
                            v,
                            true,
                            true,
                        ));
                    }
                    // Another valid data block: counts no longer match.
                    let other = (n.vals[i] + 1) % nd;
                    cases.push(u64_at(
                        val(i, 0),
                        format!("{e} data block = {other}"),
                        other,
                        true,
                        false,
                    ));
                    cases.push(u64_at(
                        key(i),
                        format!("{e} virtual block = u64::MAX"),
                        u64::MAX,
                        n.len() > 1 && i == 0,
                        true,
                    ));
                }
                TreeKind::Devices => {
                    for v in [1u64 << 40, u64::MAX] {
                        cases.push(u64_at(
                            val(i, 1),
                            format!("{e} mapped = {v}"),
                            v,
                            true,
                            true,
                        ));
                    }
                    let m = n.val(i)[1];
                    for v in [0, m + 1] {
                        cases.push(u64_at(
                            val(i, 1),
                            format!("{e} mapped = {v}"),
                            v,
                            v != m,
                            false,
                        ));
                    }
                    cases.push(u64_at(
                        key(i),
                        format!("{e} device id = u64::MAX"),
                        u64::MAX,
                        true,
                        true,
                    ));
                }
                TreeKind::SmIndex => {
                    let nb = nd.div_ceil(PER_BITMAP as u64);
                    for v in [nb, u64::MAX] {
                        cases.push(u64_at(
                            key(i),
                            format!("{e} bitmap number = {v}"),
                            v,
                            true,
                            true,
                        ));
                    }
                }
                TreeKind::Overflow => {
                    for v in [0, 1, 254, 1 << 32, u64::MAX] {
                        cases.push(u64_at(val(i, 0), format!("{e} count = {v}"), v, true, true));
                    }
                    for v in [nd, u64::MAX, 0] {
                        cases.push(u64_at(
                            key(i),
                            format!("{e} data block = {v}"),
                            v,
                            true,
                            true,
                        ));
                    }
                }
                // This pool is plain: it has no hash tree.
                TreeKind::Hash => {}
            }
        }
    }
}

fn bitmap_cases(block: u64, index: u64, meta: &MemDevice, nd: u64, cases: &mut Vec<Case>) {
    let name = format!("bitmap {index} at block {block}");
    for v in [index + 1, 1 << 40, u64::MAX] {
        cases.push(case(
            block,
            format!("{name}: number = {v}"),
            16,
            v.to_le_bytes().to_vec(),
            true,
            true,
        ));
    }
    let counts = &block_of(meta, block)[32..];
    if let Some(i) = counts.iter().position(|&c| (1..255).contains(&c)) {
        let c = counts[i];
        cases.push(case(
            block,
            format!("{name}: count {i} {c} -> 0"),
            32 + i,
            vec![0],
            true,
            true,
        ));
        cases.push(case(
            block,
            format!("{name}: count {i} {c} -> 255 (overflow, no entry)"),
            32 + i,
            vec![255],
            true,
            true,
        ));
        cases.push(case(
            block,
            format!("{name}: count {i} {c} -> {}", c + 1),
            32 + i,
            vec![c + 1],
            true,
            false,
        ));
    }
    let first = index * PER_BITMAP as u64;
    if first + (PER_BITMAP as u64) > nd {
        let past = (nd - first) as usize;
        cases.push(case(
            block,
            format!("{name}: count for a block past the pool"),
            32 + past,
            vec![1],
            true,
            true,
        ));
    }
}

fn block_of(dev: &MemDevice, b: u64) -> Vec<u8> {
    block(dev, b)
}

fn apply(base: &MemDevice, c: &Case) -> Arc<MemDevice> {
    let d = copy(base);
    let mut buf = block(&d, c.block);
    buf[c.off..c.off + c.bytes.len()].copy_from_slice(&c.bytes);
    let magic = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    // Recompute the checksum: the damage must get past it.
    seal(&mut buf, magic, MetaBlock(c.block));
    assert!(HEADER_LEN <= c.off, "{}: crafts the header", c.what);
    d.fill(c.block * 4096, &buf);
    d
}

/// What one case did (sent back from its worker thread).
struct Outcome {
    check: Result<(bool, Vec<String>), String>,
    dump: Result<(), String>,
    open: Result<(), String>,
    /// `Err`: the repaired metadata is wrong; `Ok(Err)`: repair refused, with this error;
    /// `Ok(Ok(complete))`: repaired, and whether the report says nothing was lost.
    repair: Result<Result<bool, String>, String>,
    after_use: Result<(), String>,
    largest: usize,
}

/// Uses an open pool: status, every device's first blocks discarded and written, a few
/// devices read, new devices, a delete, commit. Errors are fine; panics are not.
async fn use_pool(pool: &Arc<Pool>) -> Result<(), String> {
    let _ = pool.status_line();
    let devs = pool.devices().map_err(|e| e.to_string())?;
    for (i, (id, _)) in devs.iter().enumerate() {
        let Ok(t) = pool.thin(*id, Bytes(DATA), None) else {
            continue;
        };
        // Every device: its status and a change of its mapped count both ways (the counts
        // in the damaged leaf may be the crafted ones).
        let _ = t.status();
        let _ = t.discard(Bytes(0), Bytes(8 * 4096)).await;
        // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
        let _ = unsafe { t.write(Bytes(4096), &[7; 4096], WriteFlags::default()) }.await;
        if i < 4 || i + 4 >= devs.len() {
            let mut buf = vec![0u8; 16 * 1024];
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            let _ = unsafe { t.read(Bytes(0), &mut buf) }.await;
            // SAFETY: awaited here, in block_on: completed or dropped before the buffer goes.
            let _ = unsafe { t.write(Bytes(DATA - 4096), &[7; 512], WriteFlags::default()) }.await;
        }
        let _ = t.status();
    }
    let _ = pool.create_thin(ThinId(77));
    let _ = pool.create_snap(ThinId(78), ThinId(1000)).await;
    let _ = pool.delete(ThinId(5));
    let _ = pool.status_line();
    pool.commit().await.map_err(|e| e.to_string())
}

fn run_case(base: &MemDevice, c: &Case) -> Outcome {
    let cd: DeviceRef = apply(base, c);
    LARGEST.store(0, Ordering::Relaxed);
    let check = run(tools::check(&cd))
        .map(|r| (r.clean, r.errors))
        .map_err(|e| e.to_string());
    let dump = run(tools::dump(&cd)).map(|_| ()).map_err(|e| e.to_string());
    let out: DeviceRef = mem("meta-out", META);
    let repair = match run(tools::repair(&cd, &out)) {
        Ok(rep) => match run(tools::check(&out)) {
            Ok(r) if r.clean && r.devices == rep.devices && r.mapped_blocks == rep.mappings => {
                Ok(Ok(rep.is_complete()))
            }
            Ok(r) => Err(format!("repaired metadata: {r:?} after {rep:?}")),
            Err(e) => Err(format!("repaired metadata does not load: {e}")),
        },
        // A refusal is fine (checked below that it names a block).
        Err(e) => Ok(Err(e.to_string())),
    };
    let data: DeviceRef = mem("data", DATA);
    let (open, after_use) = match run(Pool::open(cd.clone(), data, opts(8))) {
        Ok(pool) => {
            let used = run(use_pool(&pool));
            drop(pool);
            // Whatever the pool did, the metadata it left must not crash the tools.
            let _ = run(tools::check(&cd));
            (Ok(()), used)
        }
        Err(e) => (Err(e.to_string()), Ok(())),
    };
    Outcome {
        check,
        dump,
        open,
        repair,
        after_use,
        largest: LARGEST.load(Ordering::Relaxed),
    }
}

/// Whether an error or finding names a block (or, for a count, the device it is about).
fn names_a_block(msg: &str) -> bool {
    msg.contains("block ") || msg.contains("thin ")
}

/// Whether `msg` names block `b` ("block 17", not "block 170").
fn names_block(msg: &str, b: u64) -> bool {
    let pat = format!("block {b}");
    msg.match_indices(&pat).any(|(i, _)| {
        !msg[i + pat.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

#[test]
fn crafted_fields_with_valid_checksums_are_refused_cleanly() {
    let meta = build();
    let sb = Superblock::unpack(&block(&meta, 0)).unwrap();
    assert_ne!(
        sb.held_root.0, 0,
        "the base metadata holds a metadata snapshot"
    );
    let (sites, bitmaps) = walk(&meta, &sb);
    let all = std::env::var("THIN_CRAFTED_ALL").is_ok();
    // The sample: roots, one internal non-root node, the first and last leaf of each tree.
    let mut picked: BTreeMap<u64, &Site> = BTreeMap::new();
    for kind in [
        TreeKind::Devices,
        TreeKind::Mapping,
        TreeKind::SmIndex,
        TreeKind::Overflow,
    ] {
        let of: Vec<&Site> = sites.iter().filter(|s| s.kind == kind).collect();
        assert!(!of.is_empty(), "no {kind:?} node in the base metadata");
        let mut chosen: Vec<Option<&&Site>> = vec![
            of.iter().find(|s| s.root),
            of.iter().find(|s| !s.root && !s.node.is_leaf()),
            of.iter().find(|s| s.node.is_leaf() && !s.root),
            of.iter().rev().find(|s| s.node.is_leaf()),
        ];
        if all {
            chosen.extend(of.iter().map(Some));
        }
        for s in chosen.into_iter().flatten() {
            picked.insert(s.block, s);
        }
    }
    assert!(
        sites
            .iter()
            .any(|s| s.kind == TreeKind::Devices && !s.node.is_leaf()),
        "the device tree has two levels"
    );
    assert!(
        sites
            .iter()
            .any(|s| s.kind == TreeKind::Mapping && !s.node.is_leaf()),
        "a mapping tree has two levels"
    );
    assert!(
        sites
            .iter()
            .any(|s| s.kind == TreeKind::Overflow && !s.node.is_empty()),
        "the overflow tree has an entry"
    );
    let mut cases = Vec::new();
    superblock_cases(&sb, &sites, &mut cases);
    for s in picked.values() {
        node_cases(s, &sb, &bitmaps, &mut cases);
    }
    for &(b, index) in &bitmaps {
        assert_eq!(
            u32::from_le_bytes(block(&meta, b)[4..8].try_into().unwrap()),
            BITMAP_MAGIC
        );
        bitmap_cases(b, index, &meta, sb.nr_data_blocks, &mut cases);
    }
    assert!(cases.len() > 300, "{} cases", cases.len());

    let base = Arc::new(meta);
    let mut failures = Vec::new();
    let mut refused = 0;
    for c in cases {
        if block(&base, c.block)[c.off..c.off + c.bytes.len()] == c.bytes[..] {
            continue; // not a change
        }
        let c = Arc::new(c);
        let (tx, rx) = mpsc::channel();
        let (b2, c2) = (base.clone(), c.clone());
        let worker = std::thread::spawn(move || {
            let o = run_case(&b2, &c2);
            let _ = tx.send(());
            o
        });
        // Disconnected (the worker panicked) is told apart from a worker still running.
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(Duration::from_secs(30)) {
            failures.push(format!("{}: still running after 30 s (a cycle?)", c.what));
            break;
        }
        let o = match worker.join() {
            Ok(o) => o,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{}: panicked: {msg}", c.what));
                continue;
            }
        };
        let mut fail = |m: String| failures.push(format!("{}: {m}", c.what));
        if o.largest > CASE_LIMIT {
            fail(format!("allocated {} bytes at once", o.largest));
        }
        match &o.check {
            Err(e) => {
                refused += 1;
                if !names_a_block(e) {
                    fail(format!("check error names no block: {e}"));
                }
                if c.local && !names_block(e, c.block) {
                    fail(format!("check error does not name block {}: {e}", c.block));
                }
                if o.open.is_ok() {
                    fail(format!("check refused ({e}) but open accepted"));
                }
                if o.dump.is_ok() {
                    fail(format!("check refused ({e}) but dump accepted"));
                }
            }
            Ok((clean, errors)) => {
                if c.must_detect && *clean {
                    fail("check found nothing".into());
                }
                if c.local {
                    fail(format!("check did not refuse it, only found {errors:?}"));
                }
                if !*clean && errors.iter().any(|e| !names_a_block(e)) {
                    fail(format!(
                        "check errors name neither block nor device: {errors:?}"
                    ));
                }
            }
        }
        if c.open_must_fail && o.open.is_ok() {
            fail("open accepted it".into());
        }
        if let Err(e) = &o.open {
            if !names_a_block(e) && !e.contains("data block size") && !e.contains("data device") {
                fail(format!("open error names no block: {e}"));
            }
        }
        match (&o.repair, &o.check) {
            (Err(e), _) => fail(e.clone()),
            (Ok(Err(e)), _) if !names_a_block(e) && !e.contains("metadata device") => {
                fail(format!("repair error names no block: {e}"))
            }
            (Ok(Ok(false)), Ok((true, _))) => {
                fail("repair of metadata check calls clean reports a loss".into())
            }
            _ => {}
        }
        if let (Err(e), Ok((true, _))) = (&o.after_use, &o.check) {
            fail(format!("pool on clean metadata failed: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of the crafted cases failed ({refused} refused by check):\n{}",
        failures.len(),
        failures.join("\n")
    );
}
