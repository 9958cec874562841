//! The arrays with superblocks open in this process, so that a table built again over the
//! same legs (a reload) reaches the array that is running instead of assembling it a second
//! time over metadata the running one keeps writing (as dm-thin finds a live pool).
//!
//! A running array is found by the UUID on the new table's metadata devices. When every leg
//! names the same metadata and data devices and the other arguments are the same, a new handle
//! on it takes the table's size: a larger one grows the array once that handle is in use
//! (`grow.rs`), a smaller one is refused. A table that differs in anything else (legs, level,
//! chunk, region size, rebuild list, recovery rate) assembles on its own as before arrays
//! could grow, and is refused if it also changes the size.

use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tables::io::{DeviceRef, IoError};
use tables::Bytes;

use crate::meta::{SbRead, Superblock, META_BLOCK};
use crate::parse::RaidConfig;
use crate::RaidError;

use super::{Owner, RaidDevice};

struct Entry {
    owner: Weak<Owner>,
}

static LIVE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<Entry>> {
    let mut g = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    g.retain(|e| e.owner.strong_count() > 0);
    g
}

/// Records an assembled array with superblocks.
pub(super) fn register(owner: &Arc<Owner>) {
    live().push(Entry {
        owner: Arc::downgrade(owner),
    });
}

/// `(metadata device, data device)` names per leg; `(None, None)` for a missing leg.
type LegNames = Vec<(Option<String>, Option<String>)>;

fn live_names(o: &Owner) -> LegNames {
    o.inner
        .legs
        .iter()
        .map(|l| {
            if l.missing.load(std::sync::atomic::Ordering::Acquire) {
                (None, None)
            } else {
                (l.meta.as_ref().map(|m| m.name()), Some(l.dev().name()))
            }
        })
        .collect()
}

/// The UUIDs the valid superblocks on `metas` carry.
fn probe(metas: Vec<DeviceRef>) -> Result<Vec<[u8; 16]>, RaidError> {
    // Building may run inside another runtime's task: read on a thread of its own.
    iort::run_on_io_thread(move || async move {
        let mut out = Vec::new();
        for m in &metas {
            let mut b = vec![0u8; META_BLOCK];
            // SAFETY: the buffer belongs to this future and the call is awaited in it:
            // completed, dropped first (waiting for the kernel), or leaked with it.
            if unsafe { m.read(Bytes(0), &mut b) }.await.is_ok() {
                if let SbRead::Valid(sb) = Superblock::decode(&b) {
                    out.push(sb.uuid);
                }
            }
        }
        out
    })
    .map_err(|e| RaidError::Io(IoError::eio(format!("reading the superblocks: {e}"))))
}

/// The table arguments other than size and sync mode in which `new` differs from the running
/// array's `cur`.
fn differences(cur: &RaidConfig, new: &RaidConfig) -> Vec<&'static str> {
    let mut d = Vec::new();
    if cur.level != new.level {
        d.push("raid type");
    }
    if cur.chunk != new.chunk {
        d.push("chunk size");
    }
    if cur.region != new.region {
        d.push("region_size");
    }
    if cur.rebuild != new.rebuild {
        d.push("rebuild");
    }
    if cur.max_recovery_kib != new.max_recovery_kib {
        d.push("max_recovery_rate");
    }
    if cur.legs != new.legs || cur.mirror != new.mirror {
        d.push("legs");
    }
    d
}

/// A new handle of `size` bytes on the running array these legs belong to, if one runs (see
/// the module docs); `Ok(None)` if none does, or if the table differs in more than its size
/// and sync mode (then it assembles on its own). `legs` are the devices the table opened.
pub(crate) fn reuse(
    cfg: &RaidConfig,
    size: Bytes,
    legs: &[(Option<DeviceRef>, DeviceRef)],
) -> Result<Option<RaidDevice>, RaidError> {
    let names: LegNames = cfg
        .legs
        .iter()
        .zip(legs)
        .map(|(spec, (m, d))| match spec.data {
            None => (None, None),
            Some(_) => (m.as_ref().map(|m| m.name()), Some(d.name())),
        })
        .collect();
    // Without metadata there is nothing on disk two assemblies could disagree over.
    if names.iter().any(|(m, d)| d.is_some() && m.is_none()) {
        return Ok(None);
    }
    let metas: Vec<DeviceRef> = legs.iter().filter_map(|(m, _)| m.clone()).collect();
    if metas.is_empty() || live().is_empty() {
        return Ok(None);
    }
    let uuids = probe(metas)?;
    let Some(owner) = live()
        .iter()
        .filter_map(|e| e.owner.upgrade())
        .find(|o| uuids.contains(&o.inner.uuid))
    else {
        return Ok(None);
    };
    let inner = &owner.inner;
    let cur = inner.size();
    let mut differs = differences(&inner.cfg, cfg);
    if live_names(&owner) != names && !differs.contains(&"legs") {
        differs.push("legs");
    }
    if size.0 < cur {
        return Err(RaidError::Geometry(format!(
            "the array is {cur} bytes but the table asks for {}: shrinking a raid array is \
             refused",
            size.0
        )));
    }
    if size.0 == cur {
        // The same table again shares the running array; another one assembles on its own,
        // as before arrays could grow.
        return Ok(differs
            .is_empty()
            .then(|| RaidDevice::handle(owner.clone(), size, cfg.sync)));
    }
    if !differs.is_empty() {
        return Err(RaidError::Geometry(format!(
            "the array runs with other {}; a reload that grows it must keep every argument \
             but its length",
            differs.join(", ")
        )));
    }
    inner.grow_plan(size.0).map_err(|why| {
        RaidError::Geometry(format!(
            "the array cannot grow from {cur} to {} bytes: {why}",
            size.0
        ))
    })?;
    Ok(Some(RaidDevice::handle(owner.clone(), size, cfg.sync)))
}
