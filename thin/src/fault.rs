//! Test-only fault points (compiled with `cfg(test)` only).

use std::cell::Cell;

thread_local! {
    static MAP_INSERT_PANICS: Cell<bool> = const { Cell::new(false) };
}

/// The next `Metadata::map_insert` on this thread panics half way: after the mapping tree
/// changed, before the device details point at it (the metadata lock is held then).
pub(crate) fn arm_map_insert_panic() {
    MAP_INSERT_PANICS.with(|p| p.set(true));
}

/// The fault point inside `map_insert`.
pub(crate) fn map_insert_point() {
    if MAP_INSERT_PANICS.with(|p| p.replace(false)) {
        panic!("injected fault: panic in map_insert with the metadata half changed");
    }
}
