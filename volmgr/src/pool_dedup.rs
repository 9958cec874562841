//! `volmgr pool dedup-scan`: drives a dedup pool's `dedup_scan` message until the blocks
//! written before dedup was on are hashed and shared, with a progress bar, throttled while
//! clients write.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ublk_target::control::Request;

use crate::client::{call, expect_text, StateDir};

/// What one `dedup_scan` step replied (`visited N hashed N shared N recorded N unhashed N
/// pass_done|running writes N`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Step {
    /// Mappings looked at.
    pub visited: u64,
    /// Blocks read and hashed.
    pub hashed: u64,
    /// Mappings moved onto a block with the same content.
    pub shared: u64,
    /// Blocks that got a record.
    pub recorded: u64,
    /// Live blocks still without a record.
    pub unhashed: u64,
    /// The step reached the end of the last device.
    pub pass_done: bool,
    /// Client block writes the pool served since it was opened.
    pub writes: u64,
}

/// Parses a `dedup_scan` reply.
pub fn parse_step(reply: &str) -> Result<Step> {
    let w: Vec<&str> = reply.split_whitespace().collect();
    let num = |key: &str| -> Result<u64> {
        let i = w
            .iter()
            .position(|x| *x == key)
            .with_context(|| format!("dedup_scan reply '{reply}': no '{key}'"))?;
        w.get(i + 1)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("dedup_scan reply '{reply}': no number after '{key}'"))
    };
    let pass_done = match (w.contains(&"pass_done"), w.contains(&"running")) {
        (true, false) => true,
        (false, true) => false,
        _ => bail!("dedup_scan reply '{reply}': neither pass_done nor running"),
    };
    Ok(Step {
        visited: num("visited")?,
        hashed: num("hashed")?,
        shared: num("shared")?,
        recorded: num("recorded")?,
        unhashed: num("unhashed")?,
        pass_done,
        writes: num("writes")?,
    })
}

/// The final report (`--json`).
#[derive(Debug, Default, serde::Serialize)]
pub struct ScanReport {
    /// The pool's device name.
    pub pool: String,
    /// Mappings looked at.
    pub visited: u64,
    /// Blocks read and hashed.
    pub hashed: u64,
    /// Mappings moved onto a block with the same content.
    pub shared: u64,
    /// Blocks that got a record.
    pub recorded: u64,
    /// Live blocks still without a record at the end.
    pub unhashed_left: u64,
    /// Passes that reached the end of the last device.
    pub passes: u64,
    /// Steps after which the scan paused because clients had written.
    pub throttled_steps: u64,
    /// Data blocks in use before and after.
    pub data_used_before: u64,
    /// See `data_used_before`.
    pub data_used_after: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Whether the scan is over after a step that ended a pass: nothing unhashed is left, or a
/// whole pass (not one resumed half-way) hashed nothing, so another would not either.
pub fn scan_finished(s: &Step, whole_pass: bool, hashed_this_pass: u64) -> bool {
    s.unhashed == 0 || (whole_pass && hashed_this_pass == 0)
}

/// Whether clients wrote to the pool between two steps (its write counter moved).
pub fn clients_wrote(last: Option<u64>, now: u64) -> bool {
    last.is_some_and(|w| w != now)
}

/// How long to wait so that `hashed` blocks in `elapsed` stay within `rate` per second.
pub fn rate_wait(hashed: u64, rate: Option<u64>, elapsed: Duration) -> Option<Duration> {
    let rate = rate.filter(|&x| x > 0)?;
    Duration::from_secs_f64(hashed as f64 / rate as f64)
        .checked_sub(elapsed)
        .filter(|d| !d.is_zero())
}

/// Data blocks a pool uses, from its status line (`<start> <len> thin-pool <transaction>
/// <meta used>/<total> <data used>/<total> ...`).
pub fn data_used(sd: &StateDir, pool: &str) -> Result<u64> {
    let st = expect_text(call(
        sd,
        Request::Status {
            name: pool.to_string(),
        },
    )?)?;
    let w: Vec<&str> = st.split_whitespace().collect();
    if w.get(2) != Some(&"thin-pool") {
        bail!("{pool}: not a thin pool (status: {st})");
    }
    w.get(5)
        .and_then(|x| x.split('/').next())
        .and_then(|x| x.parse().ok())
        .with_context(|| format!("{pool}: no data usage in its status '{st}'"))
}

/// Options of one scan.
pub struct ScanOpts {
    /// Mappings per step.
    pub step: u64,
    /// Most blocks hashed per second (none: as fast as the pool goes).
    pub rate: Option<u64>,
    /// Pause after a step during which clients wrote.
    pub pause: Duration,
}

/// Runs the scan of `pool` to its end; returns the report.
pub fn dedup_scan(sd: &StateDir, pool: &str, o: &ScanOpts) -> Result<ScanReport> {
    let t0 = Instant::now();
    let mut r = ScanReport {
        pool: pool.to_string(),
        data_used_before: data_used(sd, pool)?,
        ..ScanReport::default()
    };
    let step_msg = Request::Message {
        name: pool.to_string(),
        args: vec!["dedup_scan".into(), o.step.max(1).to_string()],
    };
    let bar = crate::progress::bar("{msg} [{bar:30}] {percent:>3}% {elapsed_precise} eta {eta}");
    let mut last_line = Instant::now();
    let mut total: Option<u64> = None;
    let mut last_writes: Option<u64> = None;
    // The first pass may start where an interrupted run left the daemon's cursor.
    let (mut whole_pass, mut hashed_this_pass) = (false, 0u64);
    loop {
        let reply = expect_text(call(sd, step_msg.clone())?)
            .with_context(|| format!("{pool}: dedup_scan"))?;
        let s = parse_step(&reply)?;
        r.visited = r.visited.saturating_add(s.visited);
        r.hashed = r.hashed.saturating_add(s.hashed);
        r.shared = r.shared.saturating_add(s.shared);
        r.recorded = r.recorded.saturating_add(s.recorded);
        r.unhashed_left = s.unhashed;
        hashed_this_pass = hashed_this_pass.saturating_add(s.hashed);
        // The work: the unhashed blocks there were when we started (and any found since).
        let all = *total.get_or_insert(s.unhashed.saturating_add(s.hashed));
        let all = all.max(s.unhashed);
        total = Some(all);
        let msg = format!(
            "{pool}: visited {} hashed {} shared {}, {} unhashed left",
            r.visited, r.hashed, r.shared, s.unhashed
        );
        match &bar {
            Some(b) => {
                b.set_length(all.max(1));
                b.set_position(all.saturating_sub(s.unhashed));
                b.set_message(msg);
            }
            None if last_line.elapsed() >= Duration::from_secs(5) => {
                eprintln!("{msg}");
                last_line = Instant::now();
            }
            None => {}
        }
        if s.pass_done {
            r.passes += 1;
            if scan_finished(&s, whole_pass, hashed_this_pass) {
                break;
            }
            whole_pass = true;
            hashed_this_pass = 0;
        }
        // Clients come first: back off while they write.
        if clients_wrote(last_writes, s.writes) {
            r.throttled_steps += 1;
            std::thread::sleep(o.pause);
        }
        last_writes = Some(s.writes);
        if let Some(wait) = rate_wait(r.hashed, o.rate, t0.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    r.data_used_after = data_used(sd, pool)?;
    r.seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_replies_parse_and_bad_ones_are_refused() {
        let s = parse_step("visited 10 hashed 4 shared 2 recorded 2 unhashed 7 running writes 3")
            .unwrap();
        assert_eq!(
            s,
            Step {
                visited: 10,
                hashed: 4,
                shared: 2,
                recorded: 2,
                unhashed: 7,
                pass_done: false,
                writes: 3
            }
        );
        let s = parse_step("visited 0 hashed 0 shared 0 recorded 0 unhashed 0 pass_done writes 0")
            .unwrap();
        assert!(s.pass_done);
        let e = parse_step("visited 1 hashed x running").unwrap_err();
        assert!(e.to_string().contains("'hashed'"), "{e}");
        assert!(parse_step("visited 0 hashed 0 shared 0 recorded 0 unhashed 0 writes 0").is_err());
    }

    #[test]
    fn the_scan_backs_off_when_clients_wrote_and_keeps_to_its_rate() {
        assert!(!clients_wrote(None, 5));
        assert!(!clients_wrote(Some(5), 5));
        assert!(clients_wrote(Some(5), 6));
        let s = Duration::from_secs;
        assert_eq!(rate_wait(100, None, s(0)), None);
        assert_eq!(rate_wait(100, Some(0), s(0)), None);
        // 200 blocks at 100/s are due at 2 s: 1.5 s in, wait half a second.
        assert_eq!(
            rate_wait(200, Some(100), Duration::from_millis(1500)),
            Some(Duration::from_millis(500))
        );
        assert_eq!(rate_wait(200, Some(100), s(3)), None);
    }

    #[test]
    fn a_scan_ends_when_nothing_is_left_or_a_whole_pass_hashed_nothing() {
        let done = |unhashed| Step {
            unhashed,
            pass_done: true,
            ..Step::default()
        };
        assert!(scan_finished(&done(0), false, 0));
        // A resumed (partial) pass that hashed nothing: run a whole one.
        assert!(!scan_finished(&done(5), false, 0));
        assert!(!scan_finished(&done(5), true, 3));
        assert!(scan_finished(&done(5), true, 0));
    }
}
