//! The `status` line and the messages (`check`, `repair`, `rebuild`, ...).

use std::sync::atomic::Ordering;

use tables::io::{IoError, IoResult};
use tables::Bytes;

use crate::parse::SyncMode;

use super::{Geo, Inner, LegState, SyncAction};

impl Inner {
    /// The status line of a handle of `size` bytes whose table has sync mode `sync`. Before
    /// the array has grown to that size, the part beyond the array's end counts as not yet
    /// in sync (as resync would find it), unless the table says `nosync`.
    pub(super) fn status_line(&self, size: u64, sync: SyncMode) -> String {
        let mut action = self.current_action();
        let regions = self.regions();
        let array = self.size();
        let total = Bytes(size.max(array)).sectors_floor().0;
        let have = Bytes(array).sectors_floor().0;
        // have * part / whole, in 128 bits (have * part can pass 64).
        let frac = |part: u64, whole: u64| -> u64 {
            let whole = whole.max(1);
            (have as u128 * part.min(whole) as u128 / whole as u128) as u64
        };
        let mut done = match action {
            SyncAction::Recover => frac(
                self.recover_pos.load(Ordering::Acquire),
                self.recover_units(),
            ),
            SyncAction::Resync => {
                let st = self.sync_state();
                have - frac(st.pending_count, regions)
            }
            SyncAction::Check | SyncAction::Repair => {
                let st = self.sync_state();
                frac(st.cursor, regions)
            }
            _ => have,
        };
        if total > have {
            if sync == SyncMode::Skip {
                done += total - have;
            } else if action == SyncAction::Idle {
                action = SyncAction::Resync;
            }
        }
        let health: String = self
            .legs
            .iter()
            .map(|l| match l.state() {
                LegState::Failed => 'D',
                LegState::Recovering => 'a',
                LegState::InSync if action == SyncAction::Resync => 'a',
                LegState::InSync => 'A',
            })
            .collect();
        let bitmap = if self.has_meta {
            let bm = self.bm_state();
            let dirty: u32 = bm.words.iter().map(|w| w.count_ones()).sum();
            format!("bitmap:{dirty}/{regions}")
        } else {
            "bitmap:none(full-resync-on-start)".to_string()
        };
        let mut s = format!(
            "{} {} {} {}/{} {} {} 0 - {}",
            self.cfg.level.type_name(),
            self.n(),
            health,
            done,
            total,
            action.as_str(),
            self.mismatches.load(Ordering::Relaxed),
            bitmap
        );
        if self.has_meta && matches!(self.geo, Geo::Parity { .. }) {
            s.push_str(&self.ppl_status());
        }
        let st = self.sync_state();
        if let Some(why) = &st.stuck {
            s.push_str(&format!(" stuck:{}", why.replace(' ', "_")));
        }
        if st.dirty_degraded > 0 {
            s.push_str(&format!(
                " dirty_degraded_start:{}_regions",
                st.dirty_degraded
            ));
        }
        drop(st);
        if let Some(why) = self
            .grow_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            s.push_str(&format!(" grow_failed:{}", why.replace(' ', "_")));
        }
        s
    }

    pub(super) async fn handle_message(&self, args: &[String]) -> IoResult<String> {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        match a.as_slice() {
            ["check"] | ["repair"] => {
                let mut st = self.sync_state();
                st.frozen = false;
                st.cursor = 0;
                st.scrub = Some(if a[0] == "check" {
                    SyncAction::Check
                } else {
                    SyncAction::Repair
                });
                drop(st);
                self.mismatches.store(0, Ordering::Relaxed);
                self.kick();
                Ok(String::new())
            }
            ["idle"] => {
                let mut st = self.sync_state();
                st.frozen = false;
                st.scrub = None;
                drop(st);
                self.kick();
                Ok(String::new())
            }
            ["frozen"] => {
                self.sync_state().frozen = true;
                Ok(String::new())
            }
            ["resync"] => {
                {
                    let mut st = self.sync_state();
                    st.frozen = false;
                    for p in st.pending.iter_mut() {
                        *p = true;
                    }
                    // Every flag set: a grow under way may have made room beyond `regions`.
                    st.pending_count = st.pending.len() as u64;
                }
                {
                    let mut bm = self.bm_state();
                    for w in bm.words.iter_mut() {
                        *w = u64::MAX;
                    }
                    for d in bm.dirty_pages.iter_mut() {
                        *d = true;
                    }
                    bm.mem_gen += 1;
                }
                let g = self.bm_state().mem_gen;
                self.persist_bitmap(g, true).await?;
                self.kick();
                Ok(String::new())
            }
            ["fail", idx] => {
                let i = parse_idx(idx, self.n())?;
                self.fail_leg(i, &IoError::eio("failed by message")).await;
                Ok(String::new())
            }
            ["rebuild", idx] => {
                let i = parse_idx(idx, self.n())?;
                self.replace_leg(i, None).await?;
                Ok(String::new())
            }
            ["rebuild", idx, dev] => {
                let i = parse_idx(idx, self.n())?;
                let opener = self
                    .opener
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                let Some(open) = opener else {
                    return Err(IoError::unsupported(format!(
                        "{}: this device has no opener for 'rebuild {idx} {dev}'; reload the \
                         table with 'rebuild {idx}' or call replace_leg",
                        self.name
                    )));
                };
                let d =
                    open(dev).map_err(|e| IoError::invalid(format!("rebuild {idx} {dev}: {e}")))?;
                self.replace_leg(i, Some(d)).await?;
                Ok(String::new())
            }
            _ => Err(IoError::invalid(format!(
                "{}: unknown message '{}' (check, repair, idle, frozen, resync, fail IDX, \
                 rebuild IDX [DEVICE])",
                self.name,
                args.join(" ")
            ))),
        }
    }
}

fn parse_idx(s: &str, n: usize) -> IoResult<usize> {
    match s.parse::<usize>() {
        Ok(i) if i < n => Ok(i),
        _ => Err(IoError::invalid(format!(
            "leg index '{s}' is not in 0..{n}"
        ))),
    }
}
