//! Progress of long background work (raid resync, rebuild, check) for the terminal: a bar when
//! standard error is a terminal, a plain line every few seconds otherwise (logs, scripts).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// One segment's background work, as its dm-style status line tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Work {
    /// Sectors done and in all.
    pub done: u64,
    /// Sectors in all.
    pub total: u64,
    /// What runs: `resync`, `recover`, `check`, `repair`, or `idle`/`frozen` when nothing does.
    pub action: String,
}

impl Work {
    /// Whether nothing is running any more.
    pub fn finished(&self) -> bool {
        matches!(self.action.as_str(), "idle" | "frozen")
    }
}

/// The background work in a device's status lines (raid lines: `... <done>/<total> <action>
/// ...`); lines without any are skipped.
pub fn parse_work(status: &str) -> Vec<Work> {
    const ACTIONS: [&str; 6] = ["idle", "frozen", "resync", "recover", "check", "repair"];
    status
        .lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            words.windows(2).find_map(|w| {
                let (d, t) = w[0].split_once('/')?;
                let (done, total) = (d.parse().ok()?, t.parse().ok()?);
                ACTIONS.contains(&w[1]).then(|| Work {
                    done,
                    total,
                    action: w[1].to_string(),
                })
            })
        })
        .collect()
}

/// A progress bar drawn with `template` (indicatif's), when standard error is a terminal;
/// `None` otherwise (the caller prints a plain line now and then instead).
pub fn bar(template: &str) -> Option<indicatif::ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(template)
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        b
    })
}

/// Shows progress while `poll` reports work; returns the last report once every segment is
/// finished, or an error after `limit`.
pub fn follow(
    what: &str,
    limit: Option<Duration>,
    mut poll: impl FnMut() -> anyhow::Result<Vec<Work>>,
) -> anyhow::Result<Vec<Work>> {
    let t0 = Instant::now();
    let bar = bar("{msg:>12} [{bar:40}] {percent:>3}% {elapsed_precise} eta {eta}");
    let mut last_line = Instant::now() - Duration::from_secs(60);
    loop {
        let work = poll()?;
        let running: Vec<&Work> = work.iter().filter(|w| !w.finished()).collect();
        let (done, total) = running
            .iter()
            .fold((0u64, 0u64), |(d, t), w| (d + w.done, t + w.total));
        if running.is_empty() {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            return Ok(work);
        }
        let action = running[0].action.clone();
        match &bar {
            Some(b) => {
                b.set_length(total.max(1));
                b.set_position(done);
                b.set_message(action.clone());
            }
            None if last_line.elapsed() >= Duration::from_secs(5) => {
                let pct = done.saturating_mul(100) / total.max(1);
                eprintln!("{what}: {action} {done}/{total} sectors ({pct}%)");
                last_line = Instant::now();
            }
            None => {}
        }
        if let Some(l) = limit {
            if t0.elapsed() >= l {
                if let Some(b) = &bar {
                    b.abandon();
                }
                anyhow::bail!("{what}: {action} still running after {} s", l.as_secs());
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raid_status_lines_give_their_progress() {
        let s = "0 1048576 raid raid5_ls 3 AaA 658432/1048576 recover 0 0 - bitmap:0/128\n\
                 1048576 8 zero\n\
                 1048584 2048 raid raid1 2 AA 2048/2048 idle 0 0 - bitmap:none(full-resync-on-start)\n";
        let w = parse_work(s);
        assert_eq!(
            w,
            vec![
                Work {
                    done: 658432,
                    total: 1048576,
                    action: "recover".into()
                },
                Work {
                    done: 2048,
                    total: 2048,
                    action: "idle".into()
                },
            ]
        );
        assert!(!w[0].finished() && w[1].finished());
        assert!(parse_work("0 8 thin 0 -\n").is_empty());
    }

    #[test]
    fn follow_returns_when_every_segment_is_idle_and_times_out_otherwise() {
        let mut n = 0;
        let r = follow("t", Some(Duration::from_secs(10)), || {
            n += 1;
            Ok(vec![Work {
                done: n,
                total: 2,
                action: if n >= 2 { "idle" } else { "resync" }.into(),
            }])
        })
        .unwrap();
        assert!(r[0].finished());
        let e = follow("t", Some(Duration::from_millis(1)), || {
            Ok(vec![Work {
                done: 0,
                total: 1,
                action: "recover".into(),
            }])
        })
        .unwrap_err();
        assert!(e.to_string().contains("still running"), "{e}");
    }
}
