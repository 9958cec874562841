//! Offline tools on a metadata device: check, dump, restore, repair (as thin_check,
//! thin_dump, thin_restore, thin_repair). The pool must not be open while they run.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use tables::{Bytes, DeviceRef};

use crate::disk::node::{capacity, Node, TreeKind};
use crate::disk::superblock::{max_data_blocks, vblock_limit};
use crate::error::{MetaError, MetaResult, Structure};
use crate::meta::{self, Metadata};
use crate::types::{DataBlock, MetaBlock, ThinId, VBlock, META_BLOCK_SIZE};

/// What `check` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CheckReport {
    /// No errors.
    pub clean: bool,
    /// Problems that make the metadata wrong (leaked blocks, wrong mapped counts).
    pub errors: Vec<String>,
    /// User transaction id.
    pub transaction_id: u64,
    /// Commit generation.
    pub generation: u64,
    /// Thin devices.
    pub devices: usize,
    /// Sum of mapped blocks over devices.
    pub mapped_blocks: u64,
    /// Data blocks in use / in total.
    pub data_used: u64,
    /// Data blocks in total.
    pub data_total: u64,
    /// Metadata blocks in use.
    pub meta_used: u64,
    /// Metadata blocks in total.
    pub meta_total: u64,
    /// The pool deduplicates.
    pub dedup: bool,
    /// Hash tree records (dedup pools).
    pub hash_records: u64,
    /// Records of freed blocks (left behind by a transaction that ran short of metadata
    /// space; they count for nothing and go with the next change): information.
    pub stale_hash_records: u64,
    /// Live records sharing their hash with another live record (a duplicate a full index
    /// could not find, or contents `dedup_verify` found different): information.
    pub duplicate_hashes: u64,
    /// Findings that are not errors.
    pub info: Vec<String>,
}

/// Verifies every structure (checksums, magics, block positions, levels, key order and
/// bounds, value ranges) and recounts every data reference against the space map.
/// A structural error is returned as `Err` naming the block and structure; reference count
/// and mapped-count mismatches are listed in the report.
pub async fn check(meta: &DeviceRef) -> MetaResult<CheckReport> {
    let (m, report) = meta::load(&**meta).await?;
    let mut r = CheckReport {
        transaction_id: m.sb.transaction_id,
        generation: m.sb.generation,
        data_used: m.data_used(),
        data_total: m.sb.nr_data_blocks,
        meta_used: m.meta_used(),
        meta_total: m.sb.nr_meta_blocks,
        ..CheckReport::default()
    };
    let devs = m.devices()?;
    r.devices = devs.len();
    r.mapped_blocks = devs
        .iter()
        .fold(0u64, |s, (_, i)| s.saturating_add(i.mapped));
    for (d, stored, found) in report.leaked {
        r.errors.push(format!(
            "{d}: stored reference count {stored}, found {found} references (leaked)"
        ));
    }
    for (id, stored, found) in report.bad_mapped_counts {
        r.errors.push(format!(
            "{id}: device details say {stored} mapped blocks, its tree has {found}"
        ));
    }
    for (id, stored, found) in report.bad_held_mapped_counts {
        r.errors.push(format!(
            "held metadata snapshot, {id}: device details say {stored} mapped blocks, its tree has {found}"
        ));
    }
    if m.sb.dedup {
        r.dedup = true;
        r.hash_records = report.hash_records;
        r.stale_hash_records = report.stale_hash_records.len() as u64;
        if let Some(d) = report.stale_hash_records.first() {
            r.info.push(format!(
                "{} hash records of freed blocks (first: {d}); removed by the next change",
                r.stale_hash_records
            ));
        }
        let mut live: Vec<[u64; 2]> = Vec::new();
        m.walk_leaves(m.sb.hash_root, &mut |k, v| {
            if m.data_count(DataBlock(k)) > 0 {
                live.push([v[0], v[1]]);
            }
        })?;
        live.sort_unstable();
        r.duplicate_hashes = live.windows(2).filter(|w| w[0] == w[1]).count() as u64;
        if r.duplicate_hashes > 0 {
            r.info.push(format!(
                "{} live blocks share their hash with another (index full or verify mismatch)",
                r.duplicate_hashes
            ));
        }
    }
    r.clean = r.errors.is_empty();
    Ok(r)
}

/// The hash tree's records of a dedup pool, in block order (empty for a plain pool): data
/// block and the first 128 bits of its content hash (`dedup::hash`). For tests and tools
/// that verify data blocks against their records.
pub async fn hash_records(meta: &DeviceRef) -> MetaResult<Vec<(DataBlock, [u64; 2])>> {
    let (m, _) = meta::load(&**meta).await?;
    let mut out = Vec::new();
    if m.sb.hash_root.0 != 0 {
        m.walk_leaves(m.sb.hash_root, &mut |k, v| {
            out.push((DataBlock(k), [v[0], v[1]]))
        })?;
    }
    Ok(out)
}

/// Metadata blocks the committed metadata uses (for tooling and tests).
pub async fn live_blocks(meta: &DeviceRef) -> MetaResult<Vec<MetaBlock>> {
    Ok(meta::load(&**meta).await?.0.live_blocks())
}

/// A run of consecutive mappings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpRun {
    /// First virtual block.
    pub vblock: VBlock,
    /// Its data block.
    pub dblock: DataBlock,
    /// Number of consecutive blocks.
    pub len: u64,
}

/// One thin device in a dump.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpDevice {
    /// Device id.
    pub id: ThinId,
    /// Mapped blocks.
    pub mapped_blocks: u64,
    /// Mappings, in virtual block order.
    pub mappings: Vec<DumpRun>,
}

/// A readable dump of the pool metadata (serde; JSON through `serde_json`). Sharing between
/// snapshots is not recorded: a restore gives each device its own tree, with reference
/// counts equal to the number of mappings of each block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dump {
    /// Format version of the dump.
    pub version: u32,
    /// Data block size in sectors.
    pub data_block_sectors: u32,
    /// Data blocks in the pool.
    pub nr_data_blocks: u64,
    /// User transaction id.
    pub transaction_id: u64,
    /// Devices.
    pub devices: Vec<DumpDevice>,
}

/// The text form of a dump (for people; `restore` takes the JSON form):
/// `pool data_block_sectors=128 nr_data_blocks=1024 transaction_id=3`, then per device
/// `device 1 mapped_blocks=10` followed by `  <vblock> <dblock> <len>` runs.
impl std::fmt::Display for Dump {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "pool data_block_sectors={} nr_data_blocks={} transaction_id={}",
            self.data_block_sectors, self.nr_data_blocks, self.transaction_id
        )?;
        for d in &self.devices {
            writeln!(f, "device {} mapped_blocks={}", d.id.0, d.mapped_blocks)?;
            for r in &d.mappings {
                writeln!(f, "  {} {} {}", r.vblock.0, r.dblock.0, r.len)?;
            }
        }
        Ok(())
    }
}

fn runs(maps: impl IntoIterator<Item = (VBlock, DataBlock)>) -> Vec<DumpRun> {
    let mut out: Vec<DumpRun> = Vec::new();
    for (v, d) in maps {
        if let Some(r) = out.last_mut() {
            if r.vblock.0 + r.len == v.0 && r.dblock.0 + r.len == d.0 {
                r.len += 1;
                continue;
            }
        }
        out.push(DumpRun {
            vblock: v,
            dblock: d,
            len: 1,
        });
    }
    out
}

/// Dumps valid metadata (fails like [`check`] on a structural error).
pub async fn dump(meta: &DeviceRef) -> MetaResult<Dump> {
    let (m, _) = meta::load(&**meta).await?;
    let mut devices = Vec::new();
    for (id, info) in m.devices()? {
        let maps = m.map_range(id, VBlock(0), VBlock(u64::MAX), usize::MAX)?;
        devices.push(DumpDevice {
            id,
            mapped_blocks: info.mapped,
            mappings: runs(maps),
        });
    }
    Ok(Dump {
        version: 1,
        data_block_sectors: m.sb.data_block_sectors,
        nr_data_blocks: m.sb.nr_data_blocks,
        transaction_id: m.sb.transaction_id,
        devices,
    })
}

/// Dumps the held metadata snapshot (`reserve_metadata_snap`), if there is one: the
/// mappings as they were when it was reserved.
pub async fn dump_metadata_snap(meta: &DeviceRef) -> MetaResult<Option<Dump>> {
    let (m, _) = meta::load(&**meta).await?;
    let Some(devs) = m.held_devices()? else {
        return Ok(None);
    };
    let mut devices = Vec::new();
    for (id, info) in devs {
        let maps = m.tree_range(info.root, VBlock(0), VBlock(u64::MAX))?;
        devices.push(DumpDevice {
            id,
            mapped_blocks: info.mapped,
            mappings: runs(maps),
        });
    }
    Ok(Some(Dump {
        version: 1,
        data_block_sectors: m.sb.data_block_sectors,
        nr_data_blocks: m.sb.nr_data_blocks,
        transaction_id: m.sb.transaction_id,
        devices,
    }))
}

/// Writes fresh metadata holding `dump` to `meta_out` (its whole size is used).
pub async fn restore(dump: &Dump, meta_out: &DeviceRef) -> MetaResult<()> {
    let nr_meta = meta_out.size().0 / META_BLOCK_SIZE as u64;
    let dbs = dump.data_block_sectors;
    if !dbs.is_power_of_two() || !(8..=2_097_152).contains(&dbs) {
        return Err(MetaError::Invalid(format!(
            "dump: data block size {dbs} sectors"
        )));
    }
    let mut m = Metadata::format(dbs, dump.nr_data_blocks, nr_meta)?;
    m.set_transaction_id(0, dump.transaction_id)?;
    let mut seen = HashSet::new();
    for d in &dump.devices {
        if !seen.insert(d.id) {
            return Err(MetaError::Invalid(format!("dump: {} appears twice", d.id)));
        }
        m.create_thin(d.id)?;
        for r in &d.mappings {
            // Checked before the loop: a run must end inside the pool, and its virtual
            // blocks must have byte offsets (as the loader requires).
            let (v_end, d_end) = (r.vblock.0.checked_add(r.len), r.dblock.0.checked_add(r.len));
            if v_end.is_none_or(|e| e > vblock_limit(dbs))
                || d_end.is_none_or(|e| e > dump.nr_data_blocks)
            {
                return Err(MetaError::Invalid(format!(
                    "dump: {} maps {} blocks from {} to {}, beyond the pool's {} blocks",
                    d.id, r.len, r.vblock, r.dblock, dump.nr_data_blocks
                )));
            }
            for i in 0..r.len {
                m.map_insert(d.id, VBlock(r.vblock.0 + i), DataBlock(r.dblock.0 + i))?;
            }
        }
    }
    meta::commit_offline(&**meta_out, &mut m).await
}

/// What `repair` salvaged, and what it could not.
///
/// Repair keeps every device and mapping it can read; everything else is counted here and
/// described in `problems`. Use [`RepairReport::lost_anything`] (or
/// [`RepairReport::is_complete`]) to tell whether the repaired metadata is missing anything
/// the damaged one held, e.g. to exit non-zero.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RepairReport {
    /// Devices recovered.
    pub devices: usize,
    /// Mappings recovered.
    pub mappings: u64,
    /// Devices known to be lost: device tree entries that were found but dropped (an id out
    /// of range, a key outside its node's range). Devices inside an unreadable device tree
    /// subtree are not counted here (nobody knows how many): see `unreadable_subtrees`.
    pub devices_lost: usize,
    /// Mappings known to be lost: entries found but dropped (mapping beyond the pool or
    /// beyond any device size, a key outside its node's range), those of dropped devices,
    /// and for a device whose tree had unreadable parts, how many fewer mappings were found
    /// than its details counted. A lower bound when the damage also hit those details.
    pub mappings_lost: u64,
    /// Subtrees (of the device tree or of mapping trees) that could not be read or were
    /// reached through a bad pointer (out of range, a cycle): their contents are lost.
    pub unreadable_subtrees: usize,
    /// A held metadata snapshot (`reserve_metadata_snap`) was dropped: it is not carried
    /// over. Not counted as a loss: the live devices' mappings do not depend on it.
    pub held_snapshot_dropped: bool,
    /// What was unreadable or dropped, one line each.
    pub problems: Vec<String>,
}

impl RepairReport {
    /// Whether the repaired metadata may be missing devices or mappings the damaged one
    /// held (anything dropped or unreadable). `false` means every device and mapping was
    /// carried over.
    pub fn lost_anything(&self) -> bool {
        self.devices_lost > 0 || self.mappings_lost > 0 || self.unreadable_subtrees > 0
    }

    /// Whether every device and mapping was carried over (`!lost_anything()`).
    pub fn is_complete(&self) -> bool {
        !self.lost_anything()
    }
}

/// What a tree walk that skips damage found.
struct Salvaged {
    /// Entries with keys in their nodes' ranges.
    entries: BTreeMap<u64, [u64; 2]>,
    /// Subtrees not read (unreadable, or a bad pointer).
    skipped: usize,
    /// Entries read but dropped (key outside its parent's range).
    dropped: u64,
}

async fn read_node(dev: &DeviceRef, b: MetaBlock, kind: TreeKind) -> MetaResult<Node> {
    let mut buf = vec![0u8; META_BLOCK_SIZE];
    // SAFETY: the buffer belongs to this future and the read is awaited in it: completed, dropped
    // first (waiting for the kernel), or leaked with it.
    unsafe { dev.read(Bytes(b.0 * META_BLOCK_SIZE as u64), &mut buf) }.await?;
    Node::unpack(&buf, b, kind)
}

/// Walks a tree, skipping unreadable or inconsistent subtrees (a block reached twice in
/// one tree is a cycle or a bad pointer: skipped, so the walk ends).
async fn salvage_tree(
    dev: &DeviceRef,
    root: MetaBlock,
    kind: TreeKind,
    nr_meta: u64,
    problems: &mut Vec<String>,
) -> Salvaged {
    let mut out = Salvaged {
        entries: BTreeMap::new(),
        skipped: 0,
        dropped: 0,
    };
    let mut visited = HashSet::new();
    let mut stack = vec![(root, 0u64, u64::MAX, 0usize)];
    while let Some((b, lo, hi, depth)) = stack.pop() {
        if b.0 == 0 || b.0 >= nr_meta || depth > 16 || !visited.insert(b) {
            problems.push(format!("{kind:?} tree: reference to block {} skipped", b.0));
            out.skipped += 1;
            continue;
        }
        let n = match read_node(dev, b, kind).await {
            Ok(n) => n,
            Err(e) => {
                problems.push(format!("{e} (subtree skipped)"));
                out.skipped += 1;
                continue;
            }
        };
        if n.is_leaf() {
            for i in 0..n.len() {
                let k = n.keys[i];
                if k < lo || k >= hi {
                    problems.push(format!(
                        "{kind:?} leaf {}: key {k} out of its parent's range, dropped",
                        b.0
                    ));
                    out.dropped += 1;
                    continue;
                }
                let v = n.val(i);
                out.entries
                    .entry(k)
                    .or_insert([v[0], v.get(1).copied().unwrap_or(0)]);
            }
        } else {
            for i in 0..n.len() {
                let clo = n.keys[i].max(lo);
                let chi = n.keys.get(i + 1).copied().unwrap_or(hi).min(hi);
                stack.push((n.child(i), clo, chi, depth + 1));
            }
        }
    }
    out
}

/// Rebuilds what can be found in `meta_in` into fresh metadata on `meta_out`: every
/// readable device and mapping, with reference counts recomputed from the mappings.
/// Needs a readable superblock. The report says what was lost
/// ([`RepairReport::lost_anything`]).
pub async fn repair(meta_in: &DeviceRef, meta_out: &DeviceRef) -> MetaResult<RepairReport> {
    let sb = meta::read_superblock(&**meta_in)
        .await?
        .ok_or_else(|| MetaError::Invalid("superblock is all zeroes: nothing to repair".into()))?;
    let nr_meta = sb
        .nr_meta_blocks
        .min(meta_in.size().0 / META_BLOCK_SIZE as u64);
    if sb.nr_data_blocks > max_data_blocks(nr_meta) {
        return Err(MetaError::corrupt(
            MetaBlock(0),
            Structure::Superblock,
            format!(
                "{} data blocks, but the {nr_meta} metadata blocks on the device describe at most {}",
                sb.nr_data_blocks,
                max_data_blocks(nr_meta)
            ),
        ));
    }
    // What the output can hold at most (one leaf entry per mapping): salvaging stops there
    // rather than collecting a dump that could never be restored.
    let out_blocks = meta_out.size().0 / META_BLOCK_SIZE as u64;
    let max_mappings = out_blocks.saturating_mul(capacity(1) as u64);
    let vblock_limit = vblock_limit(sb.data_block_sectors);
    let mut report = RepairReport {
        held_snapshot_dropped: sb.held_root.0 != 0,
        ..RepairReport::default()
    };
    let devs = salvage_tree(
        meta_in,
        sb.device_root,
        TreeKind::Devices,
        nr_meta,
        &mut report.problems,
    )
    .await;
    report.unreadable_subtrees += devs.skipped;
    report.devices_lost += devs.dropped as usize;
    let mut dump = Dump {
        version: 1,
        data_block_sectors: sb.data_block_sectors,
        nr_data_blocks: sb.nr_data_blocks,
        transaction_id: sb.transaction_id,
        devices: Vec::new(),
    };
    for (id, v) in devs.entries {
        let stored_mapped = v[1];
        if id >= 1 << 24 {
            report
                .problems
                .push(format!("device id {id} is out of range, dropped"));
            report.devices_lost += 1;
            report.mappings_lost = report.mappings_lost.saturating_add(stored_mapped);
            continue;
        }
        let maps = salvage_tree(
            meta_in,
            MetaBlock(v[0]),
            TreeKind::Mapping,
            nr_meta,
            &mut report.problems,
        )
        .await;
        report.unreadable_subtrees += maps.skipped;
        let mut lost = maps.dropped;
        if maps.skipped > 0 {
            // What the unreadable parts held, as far as the device details tell.
            let found = maps.entries.len() as u64 + maps.dropped;
            lost = lost.saturating_add(stored_mapped.saturating_sub(found));
        }
        let mut good = Vec::new();
        for (k, val) in maps.entries {
            if val[0] >= sb.nr_data_blocks {
                report
                    .problems
                    .push(format!("thin {id}: {k} maps beyond the pool, dropped"));
                lost += 1;
            } else if k >= vblock_limit {
                report.problems.push(format!(
                    "thin {id}: virtual block {k} is beyond any device size, dropped"
                ));
                lost += 1;
            } else {
                good.push((VBlock(k), DataBlock(val[0])));
            }
        }
        report.mappings_lost = report.mappings_lost.saturating_add(lost);
        report.mappings += good.len() as u64;
        if report.mappings > max_mappings {
            return Err(MetaError::NoSpace(format!(
                "repair: more than {max_mappings} mappings found, more than the output metadata device ({out_blocks} blocks) can hold"
            )));
        }
        dump.devices.push(DumpDevice {
            id: ThinId(id as u32),
            mapped_blocks: good.len() as u64,
            mappings: runs(good),
        });
    }
    report.devices = dump.devices.len();
    restore(&dump, meta_out).await?;
    Ok(report)
}
