//! Loading: read the superblock, walk every tree validating every block, derive the
//! metadata reference counts, read the data space map and recount every data reference.

use std::collections::HashMap;

use tables::io::BlockDevice;
use tables::Bytes;

use crate::disk::bitmap::{self, OVERFLOW, PER_BITMAP};
use crate::disk::node::{Node, TreeKind};
use crate::disk::superblock::Superblock;
use crate::error::{MetaError, MetaResult, Structure};
use crate::types::{DataBlock, MetaBlock, PerBlock, ThinId, META_BLOCK_SIZE};

use super::Metadata;

/// What loading found besides the metadata itself (for `check`).
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Data blocks whose stored count exceeds the references found (leaked space).
    pub leaked: Vec<(DataBlock, u32, u32)>,
    /// Devices whose stored mapped count differs from their tree.
    pub bad_mapped_counts: Vec<(ThinId, u64, u64)>,
}

async fn read_block(dev: &dyn BlockDevice, b: MetaBlock) -> MetaResult<Vec<u8>> {
    let mut buf = vec![0u8; META_BLOCK_SIZE];
    dev.read(Bytes(b.0 * META_BLOCK_SIZE as u64), &mut buf)
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
/// every block (checksum, magic, position, level, key order and bounds), derives metadata
/// reference counts, reads the data space map and recounts every data reference.
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
    let mut m = Metadata::empty(sb.clone());
    let nr_meta = sb.nr_meta_blocks;
    let nr_data = sb.nr_data_blocks;
    let mut kinds: HashMap<MetaBlock, TreeKind> = HashMap::new();
    let mut recount: PerBlock<DataBlock, u32> = PerBlock::new(nr_data as usize, 0);
    // (bitmap number, bitmap block, referenced from)
    let mut bitmaps: Vec<(u64, MetaBlock, MetaBlock)> = Vec::new();
    // Work item: (block, tree, expected level, lower bound, upper bound, referenced from).
    let sbb = MetaBlock(0);
    let mut stack: Vec<(MetaBlock, TreeKind, Option<u8>, u64, u64, MetaBlock)> = vec![
        (sb.device_root, TreeKind::Devices, None, 0, u64::MAX, sbb),
        (sb.sm_index_root, TreeKind::SmIndex, None, 0, u64::MAX, sbb),
        (sb.overflow_root, TreeKind::Overflow, None, 0, u64::MAX, sbb),
    ];
    if sb.held_root.0 != 0 {
        stack.push((sb.held_root, TreeKind::Devices, None, 0, u64::MAX, sbb));
    }
    while let Some((b, kind, level, lo, hi, from)) = stack.pop() {
        let st = kind.structure();
        if b.0 == 0 || b.0 >= nr_meta {
            return Err(MetaError::corrupt(
                from,
                m.nodes
                    .get(&from)
                    .map(|n| n.kind.structure())
                    .unwrap_or(Structure::Superblock),
                format!("refers to block {}, outside 1..{nr_meta}", b.0),
            ));
        }
        let node = if m.mcount[b] > 0 {
            if kinds.get(&b) != Some(&kind) {
                return Err(MetaError::corrupt(
                    b,
                    st,
                    format!(
                        "block is referenced as two different structures (also from block {})",
                        from.0
                    ),
                ));
            }
            m.mcount[b] += 1;
            m.node(b)?.clone()
        } else {
            let buf = read_block(dev, b).await?;
            let node = Node::unpack(&buf, b, kind)?;
            m.mcount[b] = 1;
            kinds.insert(b, kind);
            m.nodes.insert(b, node.clone());
            if node.is_leaf() {
                match kind {
                    TreeKind::Mapping => {
                        for d in node.data_refs() {
                            if d.0 >= nr_data {
                                return Err(MetaError::corrupt(
                                    b,
                                    st,
                                    format!("maps to {d}, beyond the pool's {nr_data}"),
                                ));
                            }
                            recount[d] += 1;
                        }
                    }
                    TreeKind::Devices => {
                        for i in 0..node.len() {
                            let root = MetaBlock(node.val(i)[0]);
                            if node.keys[i] > u32::MAX as u64 {
                                return Err(MetaError::corrupt(
                                    b,
                                    st,
                                    format!("device id {} out of range", node.keys[i]),
                                ));
                            }
                            stack.push((root, TreeKind::Mapping, None, 0, u64::MAX, b));
                        }
                    }
                    TreeKind::SmIndex => {
                        for i in 0..node.len() {
                            bitmaps.push((node.keys[i], MetaBlock(node.vals[i]), b));
                        }
                    }
                    TreeKind::Overflow => {}
                }
            } else {
                for i in 0..node.len() {
                    let clo = node.keys[i];
                    let chi = node.keys.get(i + 1).copied().unwrap_or(hi);
                    stack.push((node.child(i), kind, Some(node.level - 1), clo, chi, b));
                }
                if node.is_empty() {
                    return Err(MetaError::corrupt(b, st, "internal node has no entries"));
                }
            }
            node
        };
        if let Some(l) = level {
            if node.level != l {
                return Err(MetaError::corrupt(
                    b,
                    st,
                    format!("level {} where block {} expects {l}", node.level, from.0),
                ));
            }
        }
        if let (Some(&f), Some(&l)) = (node.keys.first(), node.keys.last()) {
            if f < lo || l >= hi {
                return Err(MetaError::corrupt(
                    b,
                    st,
                    format!(
                        "keys {f}..={l} outside the range [{lo}, {hi}) its parent block {} gives",
                        from.0
                    ),
                ));
            }
        }
    }
    let nr_bitmaps = nr_data.div_ceil(PER_BITMAP as u64);
    for (index, b, from) in bitmaps {
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
        if m.mcount[b] > 0 {
            return Err(MetaError::corrupt(
                b,
                Structure::Bitmap,
                "bitmap block is referenced twice or is also a tree node",
            ));
        }
        m.mcount[b] = 1;
        let buf = read_block(dev, b).await?;
        let counts = bitmap::unpack(&buf, b, index)?;
        let lo = index as usize * PER_BITMAP;
        let hi = (lo + PER_BITMAP).min(nr_data as usize);
        m.dcount.as_mut_slice()[lo..hi].copy_from_slice(&counts[..hi - lo]);
        if counts[hi - lo..].iter().any(|&c| c != 0) {
            return Err(MetaError::corrupt(
                b,
                Structure::Bitmap,
                "counts for blocks beyond the pool",
            ));
        }
    }
    let mut ov = Vec::new();
    m.range(sb.overflow_root, 0, u64::MAX, usize::MAX, &mut ov)?;
    for (d, v) in ov {
        let d = DataBlock(d);
        if d.0 >= nr_data
            || m.dcount[d] != OVERFLOW
            || v[0] < OVERFLOW as u64
            || v[0] > u32::MAX as u64
        {
            return Err(MetaError::Invalid(format!(
                "refcount overflow tree: entry for {d} (count {}) does not match the bitmap",
                v[0]
            )));
        }
        m.overflow.insert(d, v[0] as u32);
    }
    let mut report = LoadReport::default();
    for d in (0..nr_data).map(DataBlock) {
        let stored = m.data_count(d);
        let found = recount[d];
        if stored == OVERFLOW as u32 && !m.overflow.contains_key(&d) {
            return Err(MetaError::Invalid(format!(
                "{d}: bitmap says overflow but the overflow tree has no entry"
            )));
        }
        if found > stored {
            return Err(MetaError::Invalid(format!(
                "{d} is referenced by {found} mapping leaves but its stored count is {stored} (the block could be handed out twice)"
            )));
        }
        if found < stored {
            report.leaked.push((d, stored, found));
        }
    }
    // Mapped counts per device, memoized over shared subtrees.
    let mut memo: HashMap<MetaBlock, u64> = HashMap::new();
    for (id, info) in m.devices()? {
        let n = count_entries(&m, info.root, &mut memo)?;
        if n != info.mapped {
            report.bad_mapped_counts.push((id, info.mapped, n));
        }
    }
    m.recount_free();
    m.dirty = false;
    Ok((m, report))
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
        let mut s = 0;
        for c in node.meta_refs() {
            s += count_entries(m, c, memo)?;
        }
        s
    };
    memo.insert(b, n);
    Ok(n)
}
