//! The arguments of a `multipath` line, parsed and validated without opening anything (so
//! `table check` reports errors early), and printed back in canonical form.
//!
//! ```text
//! multipath <#features> [features...] <#hw_handler_args> [hw_handler [args...]]
//!     <#pathgroups> <initial pg>
//!     { <selector> <#selector args> <#paths> <#per-path args> { <dev> [per-path args] }... }...
//! ```
//!
//! Errors name the 1-based argument index ([`ArgError::at`]) and what was expected there.

use std::time::Duration;

use tables::registry::ArgError;
use tables::table::parse_decimal;

/// Most path groups, paths per group and argument counts a line may give (dm's limit).
pub const MAX_COUNT: u64 = 1024;

/// Most feature words (`#features`).
pub const MAX_FEATURE_ARGS: u64 = 16;

/// dm's `MPATH_MAX_PG_INIT_RETRIES`.
pub const MAX_PG_INIT_RETRIES: u64 = 50;

/// dm's `DM_PG_INIT_DELAY_MSECS` upper bound.
pub const MAX_PG_INIT_DELAY_MSECS: u64 = 60_000;

/// dm's `ST_MAX_RELATIVE_THROUGHPUT` (service-time).
pub const MAX_RELATIVE_THROUGHPUT: u64 = 100;

/// Default checker interval (multipathd's `polling_interval`).
pub const DEFAULT_CHECKER_INTERVAL: Duration = Duration::from_secs(5);

/// Bounds of our `checker_interval_ms` feature.
pub const CHECKER_INTERVAL_MS: (u64, u64) = (10, 3_600_000);

const FEATURES: &str = "queue_if_no_path, no_path_retry <N|queue|fail>, \
    retain_attached_hw_handler, pg_init_retries <N>, pg_init_delay_msecs <N>, \
    queue_mode <bio|rq|mq>, checker_interval_ms <N>";

/// How a path group picks the path for each request.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SelectorKind {
    /// `round-robin`: `repeat_count` requests to a path, then the next.
    RoundRobin,
    /// `queue-length`: the path with the fewest requests in flight.
    QueueLength,
    /// `service-time`: the path with the smallest (in-flight bytes) / relative throughput.
    ServiceTime,
}

impl SelectorKind {
    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            SelectorKind::RoundRobin => "round-robin",
            SelectorKind::QueueLength => "queue-length",
            SelectorKind::ServiceTime => "service-time",
        }
    }

    fn from_name(s: &str) -> Option<SelectorKind> {
        Some(match s {
            "round-robin" => SelectorKind::RoundRobin,
            "queue-length" => SelectorKind::QueueLength,
            "service-time" => SelectorKind::ServiceTime,
            _ => return None,
        })
    }

    /// Per-path table arguments the selector takes at most (dm's `table_args`).
    pub fn table_args(self) -> u64 {
        match self {
            SelectorKind::RoundRobin | SelectorKind::QueueLength => 1,
            SelectorKind::ServiceTime => 2,
        }
    }

    /// Per-path arguments `dmsetup status` prints (dm's `info_args`).
    pub fn info_args(self) -> u64 {
        match self {
            SelectorKind::RoundRobin => 0,
            SelectorKind::QueueLength => 1,
            SelectorKind::ServiceTime => 2,
        }
    }
}

/// `no_path_retry`: what happens to I/O while no path is usable.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NoPathRetry {
    /// `queue`: queue until a path returns (as `queue_if_no_path`).
    Queue,
    /// `fail` (or 0): fail at once.
    Fail,
    /// `N`: queue for N checker intervals without a usable path, then fail.
    Count(u32),
}

/// dm's `queue_mode` (accepted and printed; every mode behaves the same here).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum QueueMode {
    /// `bio`.
    Bio,
    /// `rq` or `mq` (request based, dm's default).
    Request,
}

/// The feature words of a line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Features {
    /// `queue_if_no_path`.
    pub queue_if_no_path: bool,
    /// `no_path_retry N|queue|fail`.
    pub no_path_retry: Option<NoPathRetry>,
    /// `retain_attached_hw_handler` (kept, no effect).
    pub retain_attached_hw_handler: bool,
    /// `pg_init_retries N` (kept, no effect: there is no path group initialisation).
    pub pg_init_retries: u32,
    /// `pg_init_delay_msecs N` (kept, no effect).
    pub pg_init_delay_msecs: Option<u32>,
    /// `queue_mode` (kept, no effect).
    pub queue_mode: Option<QueueMode>,
    /// `checker_interval_ms N`: ours, not dm's: how often failed paths are probed.
    pub checker_interval_ms: Option<u64>,
}

impl Features {
    /// Whether I/O queues when no path is usable, as the table starts.
    pub fn queues_initially(&self) -> bool {
        match self.no_path_retry {
            Some(NoPathRetry::Queue) | Some(NoPathRetry::Count(1..)) => true,
            Some(NoPathRetry::Fail) | Some(NoPathRetry::Count(0)) => self.queue_if_no_path,
            None => self.queue_if_no_path,
        }
    }

    /// Checker intervals without a usable path before queued I/O fails (`None`: forever).
    pub fn retry_limit(&self) -> Option<u32> {
        match self.no_path_retry {
            Some(NoPathRetry::Count(n)) if n > 0 => Some(n),
            _ => None,
        }
    }

    /// How often failed paths are probed.
    pub fn checker_interval(&self) -> Duration {
        self.checker_interval_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_CHECKER_INTERVAL)
    }

    fn to_words(&self) -> Vec<String> {
        let mut w: Vec<String> = Vec::new();
        if self.queue_if_no_path {
            w.push("queue_if_no_path".into());
        }
        if let Some(n) = self.no_path_retry {
            w.push("no_path_retry".into());
            w.push(match n {
                NoPathRetry::Queue => "queue".into(),
                NoPathRetry::Fail | NoPathRetry::Count(0) => "fail".into(),
                NoPathRetry::Count(n) => n.to_string(),
            });
        }
        if self.pg_init_retries > 0 {
            w.push("pg_init_retries".into());
            w.push(self.pg_init_retries.to_string());
        }
        if let Some(d) = self.pg_init_delay_msecs {
            w.push("pg_init_delay_msecs".into());
            w.push(d.to_string());
        }
        if self.retain_attached_hw_handler {
            w.push("retain_attached_hw_handler".into());
        }
        if self.queue_mode == Some(QueueMode::Bio) {
            w.push("queue_mode".into());
            w.push("bio".into());
        }
        if let Some(ms) = self.checker_interval_ms {
            w.push("checker_interval_ms".into());
            w.push(ms.to_string());
        }
        w
    }
}

/// One path as named in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathSpec {
    /// The device (a path, `major:minor`, a URI, `/dev/volmgr/NAME`).
    pub dev: String,
    /// Requests sent to this path before the selector moves on (default 1).
    pub repeat_count: u32,
    /// service-time's relative throughput, 0..=100 (default 1).
    pub relative_throughput: u32,
}

/// One priority group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupSpec {
    /// Its path selector.
    pub selector: SelectorKind,
    /// Its paths, in table order.
    pub paths: Vec<PathSpec>,
}

/// A parsed `multipath` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MultipathConfig {
    /// Feature words.
    pub features: Features,
    /// Hardware handler name and its arguments (kept and printed, no effect).
    pub hw_handler: Option<(String, Vec<String>)>,
    /// Initial path group, 1-based; 0 lets the device choose (the first usable).
    pub initial_group: usize,
    /// Priority groups, highest priority first.
    pub groups: Vec<GroupSpec>,
}

/// Reads arguments in order, keeping the 1-based index for errors.
struct Cursor<'a> {
    args: &'a [String],
    /// 0-based index of the next argument.
    at: usize,
}

impl<'a> Cursor<'a> {
    /// The next argument; `what` says what was expected if the line ends.
    fn word(&mut self, what: &str) -> Result<&'a str, ArgError> {
        let s = self.args.get(self.at).ok_or_else(|| {
            ArgError::at(
                self.at + 1,
                format!("missing {what} (the line ends after {} arguments)", self.at),
            )
        })?;
        self.at += 1;
        Ok(s.as_str())
    }

    /// The next argument as a number in `min..=max`.
    fn num(&mut self, what: &str, min: u64, max: u64) -> Result<u64, ArgError> {
        let s = self.word(what)?;
        let i = self.at;
        let v = parse_decimal(s).map_err(|m| ArgError::at(i, format!("{what}: {m}")))?;
        if v < min || v > max {
            return Err(ArgError::at(
                i,
                format!("{what} {v} is out of range ({min}..={max})"),
            ));
        }
        Ok(v)
    }
}

fn to_u32(v: u64) -> u32 {
    // Callers bound `v` by ranges far below u32::MAX.
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// Parses the arguments of a `multipath` line.
pub fn parse(args: &[String]) -> Result<MultipathConfig, ArgError> {
    parse_with_devices(args).map(|(c, _)| c)
}

/// [`parse`], also returning the 0-based indices of the arguments that name path devices.
pub fn parse_with_devices(args: &[String]) -> Result<(MultipathConfig, Vec<usize>), ArgError> {
    let mut c = Cursor { args, at: 0 };
    let features = parse_features(&mut c)?;
    let hw_handler = parse_hw_handler(&mut c)?;
    let ngroups = c.num("#pathgroups", 0, MAX_COUNT)?;
    if ngroups == 0 {
        return Err(ArgError::at(
            c.at,
            "#pathgroups is 0: a multipath needs at least one path group",
        ));
    }
    let initial_group = c.num("initial path group (0 = choose)", 0, ngroups)? as usize;
    let mut groups = Vec::new();
    let mut devs: Vec<usize> = Vec::new();
    for g in 1..=ngroups {
        let name = c.word(&format!("path selector of group {g}"))?;
        let selector = SelectorKind::from_name(name).ok_or_else(|| {
            ArgError::at(
                c.at,
                format!(
                    "group {g}: unknown path selector '{name}' (round-robin, queue-length, \
                     service-time)"
                ),
            )
        })?;
        let nsel = c.num(&format!("group {g}: #selector args"), 0, MAX_COUNT)?;
        if nsel != 0 {
            return Err(ArgError::at(
                c.at,
                format!("group {g}: {name} takes no selector arguments (got {nsel})"),
            ));
        }
        let npaths = c.num(&format!("group {g}: #paths"), 1, MAX_COUNT)?;
        let nper = c.num(
            &format!("group {g}: #per-path args of {name}"),
            0,
            selector.table_args(),
        )?;
        let mut paths = Vec::new();
        for p in 1..=npaths {
            let dev = c.word(&format!("group {g}: path {p} device"))?;
            if dev.is_empty() {
                return Err(ArgError::at(
                    c.at,
                    format!("group {g}: path {p}: empty device"),
                ));
            }
            if let Some(&prev) = devs.iter().find(|&&i| args[i] == dev) {
                return Err(ArgError::at(
                    c.at,
                    format!(
                        "group {g}: path {p}: device '{dev}' is already a path (argument {})",
                        prev + 1
                    ),
                ));
            }
            devs.push(c.at - 1);
            let mut spec = PathSpec {
                dev: dev.to_string(),
                repeat_count: 1,
                relative_throughput: 1,
            };
            if nper >= 1 {
                spec.repeat_count = to_u32(c.num(
                    &format!("group {g}: path {p} ({dev}) repeat_count"),
                    1,
                    u32::MAX as u64,
                )?);
            }
            if nper >= 2 {
                spec.relative_throughput = to_u32(c.num(
                    &format!("group {g}: path {p} ({dev}) relative_throughput"),
                    0,
                    MAX_RELATIVE_THROUGHPUT,
                )?);
            }
            paths.push(spec);
        }
        groups.push(GroupSpec { selector, paths });
    }
    if let Some(extra) = args.get(c.at) {
        return Err(ArgError::at(
            c.at + 1,
            format!(
                "unexpected argument '{extra}' after the last path group (#pathgroups is \
                 {ngroups})"
            ),
        ));
    }
    Ok((
        MultipathConfig {
            features,
            hw_handler,
            initial_group,
            groups,
        },
        devs,
    ))
}

fn parse_features(c: &mut Cursor<'_>) -> Result<Features, ArgError> {
    let n = c.num("#features", 0, MAX_FEATURE_ARGS)? as usize;
    let count_at = c.at;
    let end = c.at + n;
    if end > c.args.len() {
        return Err(ArgError::at(
            count_at,
            format!(
                "#features is {n} but only {} arguments follow",
                c.args.len() - c.at
            ),
        ));
    }
    let mut f = Features::default();
    while c.at < end {
        let word = c.word("feature")?;
        let at = c.at;
        // A feature's value must be inside the #features count.
        let value = |c: &mut Cursor<'_>, what: &str, min: u64, max: u64| {
            if c.at >= end {
                return Err(ArgError::at(
                    at,
                    format!("'{word}' needs a value inside the #features count ({n})"),
                ));
            }
            c.num(what, min, max)
        };
        match word {
            "queue_if_no_path" => f.queue_if_no_path = true,
            "retain_attached_hw_handler" => f.retain_attached_hw_handler = true,
            "no_path_retry" => {
                if c.at >= end {
                    return Err(ArgError::at(
                        at,
                        format!("'no_path_retry' needs a value (N, queue or fail) inside the #features count ({n})"),
                    ));
                }
                f.no_path_retry = Some(match c.args[c.at].as_str() {
                    "queue" => {
                        c.at += 1;
                        NoPathRetry::Queue
                    }
                    "fail" => {
                        c.at += 1;
                        NoPathRetry::Fail
                    }
                    _ => match to_u32(c.num(
                        "no_path_retry (N, queue or fail)",
                        0,
                        u32::MAX as u64,
                    )?) {
                        0 => NoPathRetry::Fail,
                        n => NoPathRetry::Count(n),
                    },
                });
            }
            "pg_init_retries" => {
                f.pg_init_retries = to_u32(value(c, "pg_init_retries", 0, MAX_PG_INIT_RETRIES)?);
            }
            "pg_init_delay_msecs" => {
                f.pg_init_delay_msecs = Some(to_u32(value(
                    c,
                    "pg_init_delay_msecs",
                    0,
                    MAX_PG_INIT_DELAY_MSECS,
                )?));
            }
            "queue_mode" => {
                if c.at >= end {
                    return Err(ArgError::at(
                        at,
                        format!("'queue_mode' needs a value (bio, rq or mq) inside the #features count ({n})"),
                    ));
                }
                let m = c.word("queue_mode")?;
                f.queue_mode = Some(match m {
                    "bio" => QueueMode::Bio,
                    "rq" | "mq" => QueueMode::Request,
                    _ => {
                        return Err(ArgError::at(
                            c.at,
                            format!("queue_mode '{m}' is not bio, rq or mq"),
                        ))
                    }
                });
            }
            "checker_interval_ms" => {
                let (lo, hi) = CHECKER_INTERVAL_MS;
                f.checker_interval_ms = Some(value(c, "checker_interval_ms", lo, hi)?);
            }
            _ => {
                // A number here usually means #features counts too many words.
                let hint = if parse_decimal(word).is_ok() {
                    format!(" (is #features {n} right?)")
                } else {
                    String::new()
                };
                return Err(ArgError::at(
                    at,
                    format!("unknown feature '{word}'{hint} (known: {FEATURES})"),
                ));
            }
        }
    }
    Ok(f)
}

fn parse_hw_handler(c: &mut Cursor<'_>) -> Result<Option<(String, Vec<String>)>, ArgError> {
    let n = c.num("#hw_handler_args", 0, MAX_COUNT)? as usize;
    if n == 0 {
        return Ok(None);
    }
    if c.at + n > c.args.len() {
        return Err(ArgError::at(
            c.at,
            format!(
                "#hw_handler_args is {n} but only {} arguments follow",
                c.args.len() - c.at
            ),
        ));
    }
    let name = c.word("hw_handler")?.to_string();
    let mut rest = Vec::with_capacity(n - 1);
    for _ in 1..n {
        rest.push(c.word("hw_handler argument")?.to_string());
    }
    Ok(Some((name, rest)))
}

impl MultipathConfig {
    /// The canonical argument list (what `dmsetup table` prints): feature words in dm's
    /// order, every per-path argument the selector has spelled out.
    pub fn to_args(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        let f = self.features.to_words();
        v.push(f.len().to_string());
        v.extend(f);
        match &self.hw_handler {
            None => v.push("0".into()),
            Some((name, rest)) => {
                v.push((rest.len() + 1).to_string());
                v.push(name.clone());
                v.extend(rest.iter().cloned());
            }
        }
        v.push(self.groups.len().to_string());
        v.push(self.initial_group.to_string());
        for g in &self.groups {
            v.push(g.selector.name().into());
            v.push("0".into());
            v.push(g.paths.len().to_string());
            v.push(g.selector.table_args().to_string());
            for p in &g.paths {
                v.push(p.dev.clone());
                v.push(p.repeat_count.to_string());
                if g.selector == SelectorKind::ServiceTime {
                    v.push(p.relative_throughput.to_string());
                }
            }
        }
        v
    }

    /// Every path, in table order, with its group (0-based).
    pub fn paths(&self) -> impl Iterator<Item = (usize, &PathSpec)> {
        self.groups
            .iter()
            .enumerate()
            .flat_map(|(g, gs)| gs.paths.iter().map(move |p| (g, p)))
    }
}
