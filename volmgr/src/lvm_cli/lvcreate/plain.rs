//! Linear and striped LVs: one allocation, one LV.

use anyhow::Result;
use lvm::alloc::{self, Request};

use super::{pv_selection, Draft, LvcreateArgs};

/// Allocates and commits a linear (`-i 1`) or striped LV.
pub(super) fn create(a: &LvcreateArgs, d: &mut Draft, zero: bool) -> Result<()> {
    let stripes = a.stripes.unwrap_or(1);
    let pvs = pv_selection(&d.scan, &d.md.vg, &a.pvs)?;
    let stripe_size = match &a.stripesize {
        Some(s) => Some(super::super::parse_lvm_size(s, 'k')?.sectors_floor()),
        None => None,
    };
    let (stripe_size, note) = alloc::stripe_size(&d.md.vg, stripes, stripe_size)?;
    note_lines(note);
    let size = a.size()?;
    let (extents, note) = size.to_extents(&d.md.vg, pvs.as_ref(), stripes)?;
    note_lines(note);
    let placed = alloc::allocate(
        &d.md.vg,
        &Request {
            extents,
            stripes,
            stripe_size,
            policy: a.policy()?,
            pvs,
            approx: size.is_approximate(),
            ..Request::default()
        },
    )?;
    let segments = placed.legs.into_iter().next().unwrap_or_default();
    let lv = d.lv(&d.name, true, segments);
    if zero {
        d.zero_start(&lv, 4096)?;
    }
    d.commit(vec![lv])
}

/// Prints lvm2's notes about rounding, one per line.
pub(super) fn note_lines(note: Option<String>) {
    for line in note.iter().flat_map(|n| n.lines()) {
        eprintln!("  {line}");
    }
}
