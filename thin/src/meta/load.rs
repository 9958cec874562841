//! Loading: read the superblock, walk every tree validating every block, derive the
//! metadata reference counts, read the data space map and recount every data reference.

use std::collections::HashMap;

use tables::io::BlockDevice;
use tables::Bytes;

use crate::disk::bitmap::{self, OVERFLOW, PER_BITMAP};
use crate::disk::node::{capacity, Node, TreeKind};
use crate::disk::superblock::{vblock_limit, Superblock};
use crate::error::{MetaError, MetaResult, Structure};
use crate::types::{DataBlock, MetaBlock, PerBlock, ThinId, META_BLOCK_SIZE};

use super::{DeviceInfo, Metadata};

/// What loading found besides the metadata itself (for `check`).
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Data blocks whose stored count exceeds the references found (leaked space).
    pub leaked: Vec<(DataBlock, u32, u32)>,
    /// Devices whose stored mapped count differs from their tree: (device, stored, found).
    pub bad_mapped_counts: Vec<(ThinId, u64, u64)>,
    /// The same for the devices of the held metadata snapshot.
    pub bad_held_mapped_counts: Vec<(ThinId, u64, u64)>,
    /// Hash tree records (dedup pools).
    pub hash_records: u64,
    /// Records of blocks whose count is 0: left behind when the metadata device was too
    /// full to remove them in the transaction that freed the block. They count for nothing
    /// (never matched, removed by the next change) and are not errors.
    pub stale_hash_records: Vec<DataBlock>,
}

async fn read_block(dev: &dyn BlockDevice, b: MetaBlock) -> MetaResult<Vec<u8>> {
    let mut buf = vec![0u8; META_BLOCK_SIZE];
    // SAFETY: the buffer belongs to this future and the read is awaited in it: completed, dropped
    // first (waiting for the kernel), or leaked with it.
    unsafe { dev.read(Bytes(b.0 * META_BLOCK_SIZE as u64), &mut buf) }
        .await
        .map_err(|e| e.context(format!("reading metadata {b}")))?;
    Ok(buf)
}

/// Reads and validates the superblock of `dev`; `Ok(None)` if block 0 is all zeroes (a
/// never-formatted metadata device).
pub async fn read_superblock(dev: &dyn BlockDevice) -> MetaResult<Option<Superblock>> {
    let buf = read_block(dev, MetaBlock(0)).await?;
    if buf.iter().all(|&x| x == 0) {
        return Ok(None);
    }
    Superblock::unpack(&buf).map(Some)
}

/// Loads the whole metadata of `dev`: walks every tree from the superblock, validating
/// every block (checksum, magic, position, level, key order and bounds, values against the
/// pool's geometry), derives metadata reference counts, reads the data space map and
/// recounts every data reference.
///
/// Every size the tables are built from is checked first: the superblock's own fields by
/// [`Superblock::unpack`], the metadata block count against `dev`. So the space map kept in
/// RAM is bounded by the metadata device's size, whatever the superblock says.
pub async fn load(dev: &dyn BlockDevice) -> MetaResult<(Metadata, LoadReport)> {
    let sb = read_superblock(dev).await?.ok_or_else(|| {
        MetaError::corrupt(
            MetaBlock(0),
            Structure::Superblock,
            "all zeroes (never formatted)",
        )
    })?;
    let dev_blocks = dev.size().0 / META_BLOCK_SIZE as u64;
    if sb.nr_meta_blocks > dev_blocks {
        return Err(MetaError::corrupt(
            MetaBlock(0),
            Structure::Superblock,
            format!(
                "{} metadata blocks but the device holds {dev_blocks}",
                sb.nr_meta_blocks
            ),
        ));
    }
    let mut l = Loader {
        dev,
        m: Metadata::empty(sb.clone()),
        kinds: HashMap::new(),
        recount: PerBlock::new(sb.nr_data_blocks as usize, 0),
        bitmaps: Vec::new(),
        overflow: Vec::new(),

        // Each mapping needs a leaf entry somewhere on the metadata device.
        max_mapped: sb.nr_meta_blocks.saturating_mul(capacity(1) as u64),
        // A virtual block's byte offset (and the end of its block) must fit in 64 bits.
        vblock_limit: vblock_limit(sb.data_block_sectors),
    };
    l.walk_trees().await?;
    let bitmap_at = l.read_bitmaps().await?;
    l.check_overflow()?;
    let Loader { mut m, recount, .. } = l;
    let mut report = LoadReport::default();
    if sb.hash_root.0 != 0 {
        let mut stale = Vec::new();
        let mut n = 0u64;
        m.walk_leaves(sb.hash_root, &mut |k, _| {
            n += 1;
            if m.data_count(DataBlock(k)) == 0 {
                stale.push(DataBlock(k));
            }
        })?;
        report.hash_records = n;
        report.stale_hash_records = stale;
    }
    for d in (0..sb.nr_data_blocks).map(DataBlock) {
        let stored = m.data_count(d);
        let found = recount[d];
        let index = d.0 / PER_BITMAP as u64;
        // The count lives in its bitmap; an absent bitmap means all zeroes (the index says).
        let (block, st) = match bitmap_at.get(&index) {
            Some(&b) => (b, Structure::Bitmap),
            None => (sb.sm_index_root, Structure::SpaceMapIndex),
        };
        if stored == OVERFLOW as u32 && !m.overflow.contains_key(&d) {
            return Err(MetaError::corrupt(
                block,
                st,
                format!("{d}: count says overflow but the overflow tree has no entry"),
            ));
        }
        if found > stored {
            return Err(MetaError::corrupt(
                block,
                st,
                format!(
                    "{d} is referenced by {found} mapping leaves but its stored count is {stored} (the block could be handed out twice)"
                ),
            ));
        }
        if found < stored {
            report.leaked.push((d, stored, found));
        }
    }
    // Mapped counts per device, memoized over shared subtrees.
    let mut memo: HashMap<MetaBlock, u64> = HashMap::new();
    report.bad_mapped_counts = bad_mapped_counts(&m, m.devices()?, &mut memo)?;
    if let Some(held) = m.held_devices()? {
        report.bad_held_mapped_counts = bad_mapped_counts(&m, held, &mut memo)?;
    }
    m.recount_free();
    m.dirty = false;
    Ok((m, report))
}

/// One tree node to visit: where it is, what it must be, and who points at it.
struct Visit {
    block: MetaBlock,
    kind: TreeKind,
    /// Level its parent expects (`None` for roots).
    level: Option<u8>,
    /// Its keys must be in `[lo, hi)` (the parent's bounds).
    lo: u64,
    hi: u64,
    /// The block holding the reference (the superblock for roots).
    from: MetaBlock,
}

impl Visit {
    fn root(block: MetaBlock, kind: TreeKind, from: MetaBlock) -> Visit {
        Visit {
            block,
            kind,
            level: None,
            lo: 0,
            hi: u64::MAX,
            from,
        }
    }
}

/// State of one load.
struct Loader<'a> {
    dev: &'a dyn BlockDevice,
    m: Metadata,
    /// Which structure each visited node was read as.
    kinds: HashMap<MetaBlock, TreeKind>,
    /// References to each data block found in mapping leaves.
    recount: PerBlock<DataBlock, u32>,
    /// (bitmap number, bitmap block, index leaf referencing it)
    bitmaps: Vec<(u64, MetaBlock, MetaBlock)>,
    /// (data block, count, overflow leaf holding it)
    overflow: Vec<(u64, u64, MetaBlock)>,

    /// Most mappings one device can have on this metadata device.
    max_mapped: u64,
    /// Virtual blocks must be below this.
    vblock_limit: u64,
}

impl Loader<'_> {
    /// Walks every tree once (shared subtrees are counted, not walked again), validating each
    /// node where it is reached. Levels strictly decrease along every path, so a pointer back
    /// up a tree (a cycle) fails the level check instead of looping.
    async fn walk_trees(&mut self) -> MetaResult<()> {
        let sb = self.m.sb.clone();
        let super_block = MetaBlock(0);
        let mut stack = vec![
            Visit::root(sb.device_root, TreeKind::Devices, super_block),
            Visit::root(sb.sm_index_root, TreeKind::SmIndex, super_block),
            Visit::root(sb.overflow_root, TreeKind::Overflow, super_block),
        ];
        if sb.held_root.0 != 0 {
            stack.push(Visit::root(sb.held_root, TreeKind::Devices, super_block));
        }
        if sb.hash_root.0 != 0 {
            stack.push(Visit::root(sb.hash_root, TreeKind::Hash, super_block));
        }
        while let Some(v) = stack.pop() {
            let (node, first) = self.reach(&v).await?;
            let (b, st) = (v.block, v.kind.structure());
            if let Some(l) = v.level {
                if node.level != l {
                    return Err(MetaError::corrupt(
                        b,
                        st,
                        format!("level {} where block {} expects {l}", node.level, v.from.0),
                    ));
                }
            }
            if let (Some(&f), Some(&l)) = (node.keys.first(), node.keys.last()) {
                if f < v.lo || l >= v.hi {
                    return Err(MetaError::corrupt(
                        b,
                        st,
                        format!(
                            "keys {f}..={l} outside the range [{}, {}) its parent block {} gives",
                            v.lo, v.hi, v.from.0
                        ),
                    ));
                }
            }
            if first {
                stack.extend(self.children(b, &v, &node)?);
            }
        }
        Ok(())
    }

    /// Counts one more reference to `v.block`; returns its node and whether this is the
    /// first time it is reached (then its contents are validated and walked).
    async fn reach(&mut self, v: &Visit) -> MetaResult<(Node, bool)> {
        let (b, nr_meta) = (v.block, self.m.sb.nr_meta_blocks);
        let st = v.kind.structure();
        if b.0 == 0 || b.0 >= nr_meta {
            let from_st = self
                .m
                .nodes
                .get(&v.from)
                .map(|n| n.kind.structure())
                .unwrap_or(Structure::Superblock);
            return Err(MetaError::corrupt(
                v.from,
                from_st,
                format!("refers to block {}, outside 1..{nr_meta}", b.0),
            ));
        }
        if self.m.mcount[b] > 0 {
            if self.kinds.get(&b) != Some(&v.kind) {
                return Err(MetaError::corrupt(
                    b,
                    st,
                    format!(
                        "block is referenced as two different structures (also from block {})",
                        v.from.0
                    ),
                ));
            }
            let c = &mut self.m.mcount[b];
            *c = c
                .checked_add(1)
                .ok_or_else(|| MetaError::corrupt(b, st, "referenced more than 2^32 times"))?;
            return Ok((self.m.node(b)?.clone(), false));
        }
        let buf = read_block(self.dev, b).await?;
        let node = Node::unpack(&buf, b, v.kind).map_err(|e| e.referenced_from(v.from))?;
        self.m.mcount[b] = 1;
        self.kinds.insert(b, v.kind);
        self.m.nodes.insert(b, node.clone());
        Ok((node, true))
    }

    /// Validates the values of a node reached for the first time and returns the nodes it
    /// points to; leaf values are checked against the pool's geometry here.
    fn children(&mut self, b: MetaBlock, v: &Visit, node: &Node) -> MetaResult<Vec<Visit>> {
        let st = v.kind.structure();
        let nr_data = self.m.sb.nr_data_blocks;
        let mut out = Vec::new();
        if !node.is_leaf() {
            if node.is_empty() {
                return Err(MetaError::corrupt(b, st, "internal node has no entries"));
            }
            for i in 0..node.len() {
                out.push(Visit {
                    block: node.child(i),
                    kind: v.kind,
                    level: Some(node.level - 1),
                    lo: node.keys[i],
                    hi: node.keys.get(i + 1).copied().unwrap_or(v.hi),
                    from: b,
                });
            }
            return Ok(out);
        }
        match v.kind {
            TreeKind::Mapping => {
                if let Some(&k) = node.keys.last() {
                    if k >= self.vblock_limit {
                        return Err(MetaError::corrupt(
                            b,
                            st,
                            format!("virtual block {k}: its byte offset does not fit in 64 bits"),
                        ));
                    }
                }
                for d in node.data_refs() {
                    if d.0 >= nr_data {
                        return Err(MetaError::corrupt(
                            b,
                            st,
                            format!("maps to {d}, beyond the pool's {nr_data}"),
                        ));
                    }
                    self.recount[d] = self.recount[d].saturating_add(1);
                }
            }
            TreeKind::Devices => {
                for i in 0..node.len() {
                    let [root, mapped] = [node.val(i)[0], node.val(i)[1]];
                    if node.keys[i] > u32::MAX as u64 {
                        return Err(MetaError::corrupt(
                            b,
                            st,
                            format!("device id {} out of range", node.keys[i]),
                        ));
                    }
                    if mapped > self.max_mapped {
                        return Err(MetaError::corrupt(
                            b,
                            st,
                            format!(
                                "thin {} has {mapped} mapped blocks, more than the metadata device can hold ({})",
                                node.keys[i], self.max_mapped
                            ),
                        ));
                    }
                    out.push(Visit::root(MetaBlock(root), TreeKind::Mapping, b));
                }
            }
            TreeKind::SmIndex => {
                for i in 0..node.len() {
                    self.bitmaps
                        .push((node.keys[i], MetaBlock(node.vals[i]), b));
                }
            }
            TreeKind::Overflow => {
                for i in 0..node.len() {
                    self.overflow.push((node.keys[i], node.vals[i], b));
                }
            }
            TreeKind::Hash => {
                if let Some(&k) = node.keys.last() {
                    if k >= nr_data {
                        return Err(MetaError::corrupt(
                            b,
                            st,
                            format!("record for data block {k}, beyond the pool's {nr_data}"),
                        ));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Reads every bitmap the index names into the data space map; returns where each
    /// bitmap is.
    async fn read_bitmaps(&mut self) -> MetaResult<HashMap<u64, MetaBlock>> {
        let nr_meta = self.m.sb.nr_meta_blocks;
        let nr_data = self.m.sb.nr_data_blocks;
        let nr_bitmaps = nr_data.div_ceil(PER_BITMAP as u64);
        let mut at = HashMap::new();
        for (index, b, from) in std::mem::take(&mut self.bitmaps) {
            if b.0 == 0 || b.0 >= nr_meta {
                return Err(MetaError::corrupt(
                    from,
                    Structure::SpaceMapIndex,
                    format!("bitmap at block {}, outside 1..{nr_meta}", b.0),
                ));
            }
            if index >= nr_bitmaps {
                return Err(MetaError::corrupt(
                    from,
                    Structure::SpaceMapIndex,
                    format!("bitmap number {index} but the pool needs only {nr_bitmaps}"),
                ));
            }
            if self.m.mcount[b] > 0 {
                return Err(MetaError::corrupt(
                    b,
                    Structure::Bitmap,
                    format!(
                        "bitmap block is referenced twice or is also a tree node (from block {})",
                        from.0
                    ),
                ));
            }
            self.m.mcount[b] = 1;
            let buf = read_block(self.dev, b).await?;
            let counts = bitmap::unpack(&buf, b, index).map_err(|e| e.referenced_from(from))?;
            let lo = index as usize * PER_BITMAP;
            let hi = (lo + PER_BITMAP).min(nr_data as usize);
            self.m.dcount.as_mut_slice()[lo..hi].copy_from_slice(&counts[..hi - lo]);
            if counts[hi - lo..].iter().any(|&c| c != 0) {
                return Err(MetaError::corrupt(
                    b,
                    Structure::Bitmap,
                    "counts for blocks beyond the pool",
                ));
            }
            at.insert(index, b);
        }
        Ok(at)
    }

    /// Overflow tree entries must belong to blocks whose bitmap count says overflow, and
    /// hold a count from 255 to 2^32 - 1.
    fn check_overflow(&mut self) -> MetaResult<()> {
        let nr_data = self.m.sb.nr_data_blocks;
        for (d, count, leaf) in std::mem::take(&mut self.overflow) {
            let what = if d >= nr_data {
                Some(format!(
                    "entry for data block {d}, beyond the pool's {nr_data}"
                ))
            } else if self.m.dcount[DataBlock(d)] != OVERFLOW {
                Some(format!(
                    "entry for data block {d}, whose bitmap count does not say overflow"
                ))
            } else if !(OVERFLOW as u64..=u32::MAX as u64).contains(&count) {
                Some(format!(
                    "data block {d}: count {count} outside {OVERFLOW}..={}",
                    u32::MAX
                ))
            } else {
                None
            };
            if let Some(what) = what {
                return Err(MetaError::corrupt(leaf, Structure::OverflowTree, what));
            }
            self.m.overflow.insert(DataBlock(d), count as u32);
        }
        Ok(())
    }
}

/// Devices whose stored mapped count differs from their mapping tree.
fn bad_mapped_counts(
    m: &Metadata,
    devices: Vec<(ThinId, DeviceInfo)>,
    memo: &mut HashMap<MetaBlock, u64>,
) -> MetaResult<Vec<(ThinId, u64, u64)>> {
    let mut out = Vec::new();
    for (id, info) in devices {
        let n = count_entries(m, info.root, memo)?;
        if n != info.mapped {
            out.push((id, info.mapped, n));
        }
    }
    Ok(out)
}

fn count_entries(
    m: &Metadata,
    b: MetaBlock,
    memo: &mut HashMap<MetaBlock, u64>,
) -> MetaResult<u64> {
    if let Some(&n) = memo.get(&b) {
        return Ok(n);
    }
    let node = m.node(b)?;
    let n = if node.is_leaf() {
        node.len() as u64
    } else {
        let mut s = 0u64;
        for c in node.meta_refs() {
            s = s.saturating_add(count_entries(m, c, memo)?);
        }
        s
    };
    memo.insert(b, n);
    Ok(n)
}
