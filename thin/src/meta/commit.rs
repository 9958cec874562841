//! The commit: fold the transaction into blocks to write and a new superblock, then
//! finish (what it freed becomes allocatable) or abort (rolled forward by the next commit);
//! and the offline commit the tools use.

use tables::io::BlockDevice;
use tables::{Bytes, WriteFlags};

use crate::error::{MetaError, MetaResult};
use crate::types::{DataBlock, MetaBlock, META_BLOCK_SIZE};

use super::Metadata;

/// What a commit must write, prepared atomically under the metadata lock.
pub struct Prepared {
    /// Node and bitmap images to write before the superblock.
    pub blocks: Vec<(MetaBlock, Vec<u8>)>,
    /// The new superblock image.
    pub superblock: Vec<u8>,
    /// Metadata blocks freed by this transaction (reusable once it is durable).
    pub freed_meta: Vec<MetaBlock>,
    /// Data blocks freed by this transaction.
    pub freed_data: Vec<DataBlock>,
}

impl Metadata {
    /// Prepares a commit: folds the space map into its trees, encodes every block written in
    /// this transaction and the new superblock, and starts the next transaction. The caller
    /// writes `blocks`, flushes, writes `superblock` with FUA, then calls
    /// [`Metadata::finish_commit`] (or [`Metadata::abort_commit`] on failure).
    pub fn prepare_commit(&mut self) -> MetaResult<Prepared> {
        // The metadata reserve exists for exactly this.
        self.commit_mode = true;
        let r = self.prepare_commit_inner();
        self.commit_mode = false;
        r
    }

    fn prepare_commit_inner(&mut self) -> MetaResult<Prepared> {
        let mut blocks = Vec::new();
        self.fold_space_map(&mut blocks)?;
        for &b in &self.new_nodes {
            if let Some(n) = self.nodes.get(&b) {
                blocks.push((b, n.pack(b)));
            }
        }
        blocks.append(&mut self.unwritten);
        self.frozen_decremented = std::mem::take(&mut self.decremented);
        self.frozen_deleted = std::mem::take(&mut self.deleted);
        // Only a commit counter: a crafted u64::MAX wraps rather than panics.
        self.sb.generation = self.sb.generation.wrapping_add(1);
        let superblock = self.sb.pack();
        self.new_nodes.clear();
        self.dirty = false;
        Ok(Prepared {
            blocks,
            superblock,
            freed_meta: std::mem::take(&mut self.meta_pending_list),
            freed_data: std::mem::take(&mut self.data_pending_list),
        })
    }

    /// The commit is durable: metadata blocks it freed become allocatable. Returns the
    /// data blocks it freed; hand them to [`Metadata::release_data`] once they are
    /// discarded on the data device (so a new write can never race the discard).
    pub fn finish_commit(&mut self, p: Prepared) -> Vec<DataBlock> {
        self.frozen_decremented.clear();
        self.frozen_deleted = false;
        for b in p.freed_meta {
            if self.meta_pending.remove(&b) && self.mcount[b] == 0 {
                self.meta_free += 1;
            }
        }
        p.freed_data
            .into_iter()
            .filter(|d| self.data_pending.contains(d))
            .collect()
    }

    /// Makes data blocks freed by a durable commit allocatable.
    pub fn release_data(&mut self, blocks: &[DataBlock]) {
        self.release_gen = self.release_gen.wrapping_add(1);
        for d in blocks {
            if self.data_pending.remove(d) && self.data_count(*d) == 0 {
                self.data_free += 1;
            }
        }
    }

    /// The commit failed: its blocks are written again with the next one, and what it freed
    /// stays pending until a commit succeeds.
    pub fn abort_commit(&mut self, p: Prepared) {
        let frozen = std::mem::take(&mut self.frozen_decremented);
        self.decremented.extend(frozen);
        self.deleted |= std::mem::take(&mut self.frozen_deleted);
        self.unwritten = p.blocks;
        self.meta_pending_list.extend(p.freed_meta);
        self.data_pending_list.extend(p.freed_data);
        self.sb.generation = self.sb.generation.wrapping_sub(1);
    }
}

/// Writes one metadata block image.
///
/// # Safety
/// The device may lend `buf` to the kernel: keep the
/// [lending contract](tables::io#the-lending-contract) for the returned future.
pub async unsafe fn write_block(
    dev: &dyn BlockDevice,
    b: MetaBlock,
    buf: &[u8],
    fua: bool,
) -> MetaResult<()> {
    let flags = if fua {
        WriteFlags::FUA
    } else {
        WriteFlags::default()
    };
    dev.write(Bytes(b.0 * META_BLOCK_SIZE as u64), buf, flags)
        .await
        .map_err(|e| MetaError::Io(e.context(format!("writing metadata {b}"))))
}

/// Commits `m` to `dev` offline (tools: restore, repair): writes every changed block,
/// flushes, writes the superblock with FUA, flushes.
pub async fn commit_offline(dev: &dyn BlockDevice, m: &mut Metadata) -> MetaResult<()> {
    let p = m.prepare_commit()?;
    for (b, buf) in &p.blocks {
        // SAFETY: `p` belongs to this future and each write is awaited in it: completed,
        // dropped first (waiting for the kernel), or leaked with it.
        unsafe { write_block(dev, *b, buf, false) }.await?;
    }
    dev.flush().await?;
    // SAFETY: as for the blocks above.
    unsafe { write_block(dev, MetaBlock(0), &p.superblock, true) }.await?;
    dev.flush().await?;
    let freed = m.finish_commit(p);
    m.release_data(&freed);
    Ok(())
}
