//! Test-only queue-thread faults (feature `fault-injection`, which only this crate's own tests
//! and examples turn on), for checking in the VM that a dead queue thread fails its device.
//!
//! `VOLMGR_UBLK_FAULT=KIND@SECTOR`: the queue thread that receives a request starting at
//! 512-byte sector SECTOR dies. KIND is `tag-error` (that tag's task fails with EIO, leaving
//! the request uncompleted), `tag-panic` (that tag's task panics outside the per-request
//! `catch_unwind`), `loop-error` (the queue's event loop fails at its next round) or
//! `thread-panic` (the event loop panics at its next round, unwinding the whole thread).

use std::cell::Cell;
use std::sync::OnceLock;

use libublk::{sys, UblkError};

/// How the queue thread dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    TagError,
    TagPanic,
    LoopError,
    ThreadPanic,
}

#[derive(Debug, Clone, Copy)]
struct Fault {
    kind: Kind,
    sector: u64,
}

fn parse(v: &str) -> Option<Fault> {
    let (kind, sector) = v.split_once('@')?;
    let kind = match kind {
        "tag-error" => Kind::TagError,
        "tag-panic" => Kind::TagPanic,
        "loop-error" => Kind::LoopError,
        "thread-panic" => Kind::ThreadPanic,
        _ => return None,
    };
    Some(Fault {
        kind,
        sector: sector.parse().ok()?,
    })
}

/// The armed fault (read once per process).
fn armed() -> Option<Fault> {
    static F: OnceLock<Option<Fault>> = OnceLock::new();
    *F.get_or_init(|| {
        let v = std::env::var("VOLMGR_UBLK_FAULT").ok()?;
        let f = parse(&v);
        match f {
            Some(f) => log::warn!("fault injection armed: {f:?}"),
            None => log::error!(
                "VOLMGR_UBLK_FAULT={v}: want tag-error|tag-panic|loop-error|thread-panic@SECTOR"
            ),
        }
        f
    })
}

thread_local! {
    /// Set on a queue thread when its event loop is to fail (LoopError or ThreadPanic).
    static LOOP_FAULT: Cell<Option<Kind>> = const { Cell::new(None) };
}

/// Called by a tag task for each request it receives.
pub(super) fn on_request(iod: &sys::ublksrv_io_desc) -> Result<(), UblkError> {
    let Some(f) = armed() else {
        return Ok(());
    };
    if iod.start_sector != f.sector {
        return Ok(());
    }
    log::warn!("fault injection: {:?} at sector {}", f.kind, f.sector);
    match f.kind {
        Kind::TagError => Err(UblkError::OtherError(-libc::EIO)),
        Kind::TagPanic => panic!("fault injection: tag panic at sector {}", f.sector),
        Kind::LoopError | Kind::ThreadPanic => {
            LOOP_FAULT.with(|e| e.set(Some(f.kind)));
            Ok(())
        }
    }
}

/// Called by the event loop at each round: the injected failure, if armed on this thread.
pub(super) fn loop_error() -> Result<(), UblkError> {
    match LOOP_FAULT.with(Cell::get) {
        Some(Kind::LoopError) => Err(UblkError::OtherError(-libc::EIO)),
        Some(Kind::ThreadPanic) => panic!("fault injection: queue thread panic"),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fault_spec_parses() {
        let f = parse("tag-error@65536").unwrap();
        assert_eq!((f.kind, f.sector), (Kind::TagError, 65536));
        assert_eq!(parse("tag-panic@0").unwrap().kind, Kind::TagPanic);
        assert_eq!(parse("loop-error@8").unwrap().kind, Kind::LoopError);
        assert_eq!(parse("thread-panic@8").unwrap().kind, Kind::ThreadPanic);
        assert!(parse("tag-panic").is_none());
        assert!(parse("explode@8").is_none());
        assert!(parse("tag-panic@x").is_none());
    }
}
