//! Thin devices: the device tree (id -> mapping root and mapped count), create, snapshot
//! and delete, the mapping operations of the I/O path, and the held metadata snapshot.

use crate::disk::node::{Node, TreeKind};
use crate::error::{MetaError, MetaResult};
use crate::types::{DataBlock, MetaBlock, ThinId, VBlock};

use super::{DeviceInfo, Lookup, Metadata, Val};

/// A device's mapped count after a change; `None` (it would wrap) means the stored count
/// contradicts the tree.
fn mapped_count(id: ThinId, n: Option<u64>) -> MetaResult<u64> {
    n.ok_or_else(|| MetaError::Internal(format!("mapped block count of {id} is out of range")))
}

impl DeviceInfo {
    /// Details from a device tree leaf value `[root, mapped]`.
    fn from_val(v: Val) -> DeviceInfo {
        DeviceInfo {
            root: MetaBlock(v[0]),
            mapped: v[1],
        }
    }
}

impl Metadata {
    /// Details of device `id`, if it exists.
    pub fn device(&self, id: ThinId) -> MetaResult<Option<DeviceInfo>> {
        Ok(self
            .lookup_path(self.sb.device_root, id.0 as u64)?
            .map(|(v, _)| DeviceInfo::from_val(v)))
    }

    fn device_or_err(&self, id: ThinId) -> MetaResult<DeviceInfo> {
        self.device(id)?
            .ok_or_else(|| MetaError::Invalid(format!("{id} does not exist")))
    }

    /// Makes the device-tree path to `id` private before its mapping tree changes: if a
    /// held metadata snapshot shares that path, shadowing it gives the mapping root its
    /// second reference, so the mapping tree is then copied rather than changed under the
    /// snapshot.
    fn device_for_write(&mut self, id: ThinId, info: DeviceInfo) -> MetaResult<DeviceInfo> {
        let exclusive = self
            .lookup_path(self.sb.device_root, id.0 as u64)?
            .map(|(_, e)| e)
            .unwrap_or(true);
        if !exclusive {
            self.set_device(id, info)?;
        }
        Ok(info)
    }

    fn set_device(&mut self, id: ThinId, info: DeviceInfo) -> MetaResult<()> {
        let (r, _) = self.insert(self.sb.device_root, id.0 as u64, [info.root.0, info.mapped])?;
        self.sb.device_root = r;
        self.dirty = true;
        Ok(())
    }

    /// Every device of the device tree at `root` with its details.
    fn device_entries(&self, root: MetaBlock) -> MetaResult<Vec<(ThinId, DeviceInfo)>> {
        let mut out = Vec::new();
        self.range(root, 0, u64::MAX, usize::MAX, &mut out)?;
        Ok(out
            .into_iter()
            .map(|(k, v)| (ThinId(k as u32), DeviceInfo::from_val(v)))
            .collect())
    }

    /// Mappings in `[lo, hi)` of the mapping tree at `root`, at most `limit`.
    fn mappings(
        &self,
        root: MetaBlock,
        lo: VBlock,
        hi: VBlock,
        limit: usize,
    ) -> MetaResult<Vec<(VBlock, DataBlock)>> {
        let mut out = Vec::new();
        self.range(root, lo.0, hi.0, limit, &mut out)?;
        Ok(out
            .into_iter()
            .map(|(k, v)| (VBlock(k), DataBlock(v[0])))
            .collect())
    }

    /// All device ids with their details.
    pub fn devices(&self) -> MetaResult<Vec<(ThinId, DeviceInfo)>> {
        self.device_entries(self.sb.device_root)
    }

    /// `create_thin`: a new empty device.
    pub fn create_thin(&mut self, id: ThinId) -> MetaResult<()> {
        if self.device(id)?.is_some() {
            return Err(MetaError::Invalid(format!("{id} already exists")));
        }
        // The new mapping tree is one leaf (no root yet: block 0 stands for "none").
        self.ensure_meta(&[self.sb.device_root, MetaBlock(0)])?;
        let root = self.new_node(Node::empty_leaf(TreeKind::Mapping))?;
        self.set_device(id, DeviceInfo { root, mapped: 0 })
    }

    /// `create_snap`: device `id` shares `origin`'s mapping root. O(1).
    pub fn create_snap(&mut self, id: ThinId, origin: ThinId) -> MetaResult<()> {
        if self.device(id)?.is_some() {
            return Err(MetaError::Invalid(format!("{id} already exists")));
        }
        let o = self.device_or_err(origin)?;
        self.ensure_meta(&[self.sb.device_root])?;
        self.mcount[o.root] += 1;
        if let Err(e) = self.set_device(id, o) {
            self.mcount[o.root] -= 1;
            return Err(e);
        }
        Ok(())
    }

    /// `delete`: drops the device; frees every block nothing else references.
    pub fn delete(&mut self, id: ThinId) -> MetaResult<()> {
        self.deleted = true;
        let (r, old) = self.remove(self.sb.device_root, id.0 as u64)?;
        self.sb.device_root = r;
        match old {
            Some(v) => self.dec_meta(DeviceInfo::from_val(v).root)?,
            None => return Err(MetaError::Invalid(format!("{id} does not exist"))),
        }
        self.drain_forget()
    }

    /// Where virtual block `v` of device `id` lives, and whether a write may go in place:
    /// only if no other device references the block now *and* none can in the last durable
    /// metadata (no count of it dropped and no device was deleted since; a power cut would
    /// bring that sharing back).
    pub fn map_lookup(&self, id: ThinId, v: VBlock) -> MetaResult<Option<Lookup>> {
        let (val, dev_path_excl) = self
            .lookup_path(self.sb.device_root, id.0 as u64)?
            .ok_or_else(|| MetaError::Invalid(format!("{id} does not exist")))?;
        let dev = DeviceInfo::from_val(val);
        // A held metadata snapshot shares the device tree: then every mapping is shared.
        let quiet = !self.deleted && !self.frozen_deleted && dev_path_excl;
        Ok(self.lookup_path(dev.root, v.0)?.map(|(val, path_excl)| {
            let d = DataBlock(val[0]);
            Lookup {
                block: d,
                exclusive: path_excl
                    && quiet
                    && self.data_count(d) == 1
                    && !self.decremented.contains(&d)
                    && !self.frozen_decremented.contains(&d),
            }
        }))
    }

    /// Maps `v` of device `id` to `d` (a block from [`Metadata::reserve_data`], or any block
    /// to share it), dropping the reference of the block it replaces.
    pub fn map_insert(&mut self, id: ThinId, v: VBlock, d: DataBlock) -> MetaResult<()> {
        let dev = self.device_or_err(id)?;
        self.check_data(d, "map")?;
        let dr = self.sb.device_root;
        self.ensure_meta(&[dev.root, dr, dr])?;
        let mut dev = self.device_for_write(id, dev)?;
        let (root, old) = self.insert(dev.root, v.0, [d.0, 0])?;
        self.inc_data(d)?;
        #[cfg(test)]
        crate::fault::map_insert_point();
        dev.root = root;
        match old {
            Some(o) => self.dec_data(DataBlock(o[0]))?,
            None => dev.mapped = mapped_count(id, dev.mapped.checked_add(1))?,
        }
        self.set_device(id, dev)?;
        self.drain_forget()
    }

    /// Unmaps `v` of device `id`; returns the block it was mapped to.
    pub fn map_remove(&mut self, id: ThinId, v: VBlock) -> MetaResult<Option<DataBlock>> {
        let dev = self.device_or_err(id)?;
        if self.lookup_path(dev.root, v.0)?.is_none() {
            return Ok(None);
        }
        let mapped = mapped_count(id, dev.mapped.checked_sub(1))?;
        let dr = self.sb.device_root;
        self.ensure_meta(&[dev.root, dr, dr])?;
        let mut dev = self.device_for_write(id, dev)?;
        let (root, old) = self.remove(dev.root, v.0)?;
        dev.root = root;
        if let Some(o) = old {
            dev.mapped = mapped;
            self.dec_data(DataBlock(o[0]))?;
            self.set_device(id, dev)?;
            self.drain_forget()?;
        }
        Ok(old.map(|o| DataBlock(o[0])))
    }

    /// Mappings of device `id` with virtual blocks in `[lo, hi)`, at most `limit`.
    pub fn map_range(
        &self,
        id: ThinId,
        lo: VBlock,
        hi: VBlock,
        limit: usize,
    ) -> MetaResult<Vec<(VBlock, DataBlock)>> {
        let dev = self.device_or_err(id)?;
        self.mappings(dev.root, lo, hi, limit)
    }

    /// Highest mapped virtual block of device `id`.
    pub fn highest_mapped(&self, id: ThinId) -> MetaResult<Option<VBlock>> {
        let dev = self.device_or_err(id)?;
        let mut cur = dev.root;
        loop {
            let n = self.node(cur)?;
            if n.is_leaf() {
                return Ok(n.keys.last().map(|&k| VBlock(k)));
            }
            match n.len().checked_sub(1) {
                Some(last) => cur = n.child(last),
                None => return Ok(None),
            }
        }
    }

    /// `reserve_metadata_snap`: keeps the current device tree (and through it every
    /// mapping tree and the data they map) alive and readable by tools until released. O(1):
    /// the root gains a reference and later changes shadow around it.
    pub fn reserve_metadata_snap(&mut self) -> MetaResult<MetaBlock> {
        if self.sb.held_root.0 != 0 {
            return Err(MetaError::Invalid(format!(
                "a metadata snapshot is already held at {}",
                self.sb.held_root
            )));
        }
        self.ensure_meta(&[self.sb.device_root])?;
        let r = self.sb.device_root;
        self.mcount[r] += 1;
        self.sb.held_root = r;
        self.dirty = true;
        Ok(r)
    }

    /// `release_metadata_snap`: drops the held snapshot; what only it referenced is freed.
    pub fn release_metadata_snap(&mut self) -> MetaResult<()> {
        let r = self.sb.held_root;
        if r.0 == 0 {
            return Err(MetaError::Invalid("no metadata snapshot is held".into()));
        }
        // Like a delete, this unshares whole subtrees without data counts dropping.
        self.deleted = true;
        self.sb.held_root = MetaBlock(0);
        self.dirty = true;
        self.dec_meta(r)?;
        self.drain_forget()
    }

    /// The held metadata snapshot's devices, if one is held.
    pub fn held_devices(&self) -> MetaResult<Option<Vec<(ThinId, DeviceInfo)>>> {
        let r = self.sb.held_root;
        if r.0 == 0 {
            return Ok(None);
        }
        self.device_entries(r).map(Some)
    }

    /// Mappings in `[lo, hi)` of the tree rooted at `root` (a root from [`DeviceInfo`]).
    pub fn tree_range(
        &self,
        root: MetaBlock,
        lo: VBlock,
        hi: VBlock,
    ) -> MetaResult<Vec<(VBlock, DataBlock)>> {
        self.mappings(root, lo, hi, usize::MAX)
    }
}
