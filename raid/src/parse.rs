//! Table-line arguments of the `raid` and `mirror` targets, parsed and validated without
//! opening anything (so `table check` reports errors early).

use tables::registry::ArgError;
use tables::Sectors;

use crate::geometry::MAX_CHUNK_SECTORS;
use crate::layout::{raid10_near, Raid5Layout};

/// RAID level and layout.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Level {
    /// N-way mirror.
    Raid1,
    /// Single parity (raid4 is [`Raid5Layout::ParityN`]).
    Raid5(Raid5Layout),
    /// Near-layout striped mirrors with `copies` copies of every chunk.
    Raid10 {
        /// Copies of each chunk.
        copies: usize,
    },
}

impl Level {
    /// The dm-raid type name as printed.
    pub fn type_name(self) -> &'static str {
        match self {
            Level::Raid1 => "raid1",
            Level::Raid5(l) => l.type_name(),
            Level::Raid10 { .. } => "raid10",
        }
    }
    /// Superblock level and layout codes.
    pub fn codes(self) -> (u32, u32) {
        match self {
            Level::Raid1 => (1, 0),
            Level::Raid5(l) => (
                if l == Raid5Layout::ParityN { 4 } else { 5 },
                match l {
                    Raid5Layout::LeftAsymmetric => 0,
                    Raid5Layout::RightAsymmetric => 1,
                    Raid5Layout::LeftSymmetric => 2,
                    Raid5Layout::RightSymmetric => 3,
                    Raid5Layout::ParityN => 5,
                },
            ),
            Level::Raid10 { copies } => (10, 0x100 | copies as u32),
        }
    }
    /// Whether an array of `legs` legs still holds every piece of data when the legs for
    /// which `bad` is true are gone.
    pub fn tolerates(self, legs: usize, bad: impl Fn(usize) -> bool) -> bool {
        match self {
            Level::Raid1 => (0..legs).any(|i| !bad(i)),
            Level::Raid5(_) => (0..legs).filter(|&i| bad(i)).count() <= 1,
            Level::Raid10 { copies } => {
                // Which legs hold a chunk depends only on the chunk number modulo `legs`.
                let mut v = Vec::new();
                (0..legs as u64).all(|c| {
                    raid10_near(legs, copies, c, &mut v);
                    v.iter().any(|cp| !bad(cp.leg))
                })
            }
        }
    }
}

/// Initial synchronisation requested by the table.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// Resync what the metadata says is dirty (everything, for a new array).
    #[default]
    Default,
    /// `sync`: force a full resync.
    Force,
    /// `nosync`: a new array (or one without metadata) is taken as already in sync.
    Skip,
}

/// One leg as named in the table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LegSpec {
    /// Metadata device, `None` for `-`.
    pub meta: Option<String>,
    /// Data device; `None` for a leg given as `- -` (failed or missing at creation, as in
    /// dm-raid): the array runs without it until `rebuild <idx> <device>` replaces it.
    pub data: Option<String>,
    /// Start of the leg's area on the data device (`mirror` lines only).
    pub offset: Sectors,
}

/// A parsed `raid` or `mirror` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RaidConfig {
    /// Level and layout.
    pub level: Level,
    /// Chunk size (ignored for raid1).
    pub chunk: Sectors,
    /// Bitmap region size, if given.
    pub region: Option<Sectors>,
    /// Legs to rebuild regardless of their metadata.
    pub rebuild: Vec<usize>,
    /// Initial sync mode.
    pub sync: SyncMode,
    /// `max_recovery_rate` in KiB/s per leg (0 = unthrottled beyond yielding to client I/O).
    pub max_recovery_kib: u64,
    /// Legs in table order.
    pub legs: Vec<LegSpec>,
    /// Whether the line was a dm-mirror line (printed back in that syntax).
    pub mirror: bool,
}

/// Most legs an array may have (the failed-legs mask is a `u64`).
pub const MAX_LEGS: usize = 64;

/// Highest `max_recovery_rate` (KiB/s), as dm-raid (a C `int`).
pub const MAX_RECOVERY_KIB: u64 = i32::MAX as u64;

fn num(args: &[String], i: usize, what: &str) -> Result<u64, ArgError> {
    let s = args
        .get(i)
        .ok_or_else(|| ArgError::whole(format!("missing {what} (argument {})", i + 1)))?;
    s.parse::<u64>()
        .map_err(|_| ArgError::at(i + 1, format!("{what} '{s}' is not a number")))
}

fn level_of(name: &str) -> Option<Level> {
    Some(match name {
        "raid1" => Level::Raid1,
        "raid4" | "raid5_n" => Level::Raid5(Raid5Layout::ParityN),
        "raid5" | "raid5_ls" => Level::Raid5(Raid5Layout::LeftSymmetric),
        "raid5_la" => Level::Raid5(Raid5Layout::LeftAsymmetric),
        "raid5_ra" => Level::Raid5(Raid5Layout::RightAsymmetric),
        "raid5_rs" => Level::Raid5(Raid5Layout::RightSymmetric),
        "raid10" => Level::Raid10 { copies: 2 },
        _ => return None,
    })
}

/// Parses the arguments of a `raid` line.
pub fn parse_raid(args: &[String]) -> Result<RaidConfig, ArgError> {
    let t = args
        .first()
        .ok_or_else(|| ArgError::whole("missing raid_type"))?;
    let mut level = level_of(t).ok_or_else(|| {
        ArgError::at(
            1,
            format!(
                "unsupported raid_type '{t}' (raid1, raid4, raid5, raid5_la, raid5_ra, \
                 raid5_ls, raid5_rs, raid10)"
            ),
        )
    })?;
    let nparams = num(args, 1, "#raid_params")?;
    if nparams == 0 {
        return Err(ArgError::at(
            2,
            "#raid_params must be at least 1 (the chunk size)",
        ));
    }
    // Parameters, then #raid_devs, must all be on the line.
    if nparams >= args.len() as u64 - 2 {
        return Err(ArgError::whole(format!(
            "#raid_params says {nparams} parameters but the line ends early"
        )));
    }
    let pend = 2 + nparams as usize;
    let chunk = Sectors(num(args, 2, "chunk_size")?);
    let mut cfg = RaidConfig {
        level,
        chunk,
        region: None,
        rebuild: Vec::new(),
        sync: SyncMode::Default,
        max_recovery_kib: 0,
        legs: Vec::new(),
        mirror: false,
    };
    let mut copies = None;
    let mut i = 3;
    while i < pend {
        let key = args[i].as_str();
        let val = |i: usize| -> Result<u64, ArgError> {
            if i + 1 >= pend {
                return Err(ArgError::at(i + 1, format!("'{key}' needs a value")));
            }
            num(args, i + 1, key)
        };
        match key {
            "sync" => cfg.sync = SyncMode::Force,
            "nosync" => cfg.sync = SyncMode::Skip,
            "rebuild" => {
                cfg.rebuild.push(val(i)? as usize);
                i += 1;
            }
            "region_size" => {
                let r = val(i)?;
                if r == 0 || !r.is_power_of_two() {
                    return Err(ArgError::at(
                        i + 2,
                        format!("region_size {r} must be a power of two number of sectors"),
                    ));
                }
                cfg.region = Some(Sectors(r));
                i += 1;
            }
            "raid10_copies" => {
                copies = Some(val(i)? as usize);
                i += 1;
            }
            "raid10_format" => {
                if i + 1 >= pend {
                    return Err(ArgError::at(i + 1, "'raid10_format' needs a value"));
                }
                if args[i + 1] != "near" {
                    return Err(ArgError::at(
                        i + 2,
                        format!("raid10_format '{}' not supported (only near)", args[i + 1]),
                    ));
                }
                i += 1;
            }
            "max_recovery_rate" => {
                cfg.max_recovery_kib = val(i)?;
                i += 1;
            }
            // Accepted for compatibility; they tune md internals we do not have.
            "daemon_sleep" | "min_recovery_rate" | "stripe_cache" | "max_write_behind"
            | "write_mostly" => {
                val(i)?;
                i += 1;
            }
            "journal_dev" | "journal_mode" => {
                return Err(ArgError::at(
                    i + 1,
                    "journal_dev is not supported: this raid closes the write hole with the \
                     write-intent bitmap, and while degraded with a partial parity log on the \
                     metadata devices (see ARCHITECTURE.md, RAID)",
                ))
            }
            "data_offset" | "delta_disks" => {
                return Err(ArgError::at(
                    i + 1,
                    format!("'{key}' (reshape) is not supported"),
                ))
            }
            _ => {
                return Err(ArgError::at(
                    i + 1,
                    format!("unknown raid parameter '{key}'"),
                ))
            }
        }
        i += 1;
    }
    if let Some(c) = copies {
        match level {
            Level::Raid10 { .. } => level = Level::Raid10 { copies: c },
            _ => return Err(ArgError::whole("raid10_copies given for a non-raid10 type")),
        }
        cfg.level = level;
    }
    let ndev = num(args, pend, "#raid_devs")?;
    let devs = &args[pend + 1..];
    if Some(devs.len() as u64) != ndev.checked_mul(2) {
        return Err(ArgError::at(
            pend + 1,
            format!(
                "#raid_devs is {ndev}, so {} device arguments (metadata and data pairs) are \
                 expected, found {}",
                ndev as u128 * 2,
                devs.len()
            ),
        ));
    }
    let dash = |s: &String| (s != "-").then(|| s.clone());
    for (i, p) in devs.chunks(2).enumerate() {
        let (meta, data) = (dash(&p[0]), dash(&p[1]));
        if meta.is_some() && data.is_none() {
            return Err(ArgError::at(
                pend + 3 + 2 * i,
                format!(
                    "leg {i}: a missing leg is given as '- -' (a metadata device needs its \
                     data device)"
                ),
            ));
        }
        cfg.legs.push(LegSpec {
            meta,
            data,
            offset: Sectors(0),
        });
    }
    // Missing legs have neither; the others must agree.
    let present = cfg.legs.iter().filter(|l| l.data.is_some()).count();
    let metas = cfg.legs.iter().filter(|l| l.meta.is_some()).count();
    if metas != 0 && metas != present {
        return Err(ArgError::at(
            pend + 2,
            "either every leg has a metadata device or none has ('-')",
        ));
    }
    check_common(&cfg, pend + 1)?;
    Ok(cfg)
}

/// Checks of a parsed line that need no device: bounds of every value, and that the legs to
/// rebuild leave a copy of every piece of data. `devs_arg` is the position of `#raid_devs`.
fn check_common(cfg: &RaidConfig, devs_arg: usize) -> Result<(), ArgError> {
    let n = cfg.legs.len();
    if n > MAX_LEGS {
        return Err(ArgError::at(
            devs_arg,
            format!("{n} legs; at most {MAX_LEGS}"),
        ));
    }
    let min = match cfg.level {
        Level::Raid1 => 2,
        Level::Raid5(_) => 3,
        Level::Raid10 { copies } => {
            if copies < 2 {
                return Err(ArgError::whole(format!(
                    "raid10_copies {copies} must be at least 2"
                )));
            }
            copies
        }
    };
    if n < min {
        return Err(ArgError::at(
            devs_arg,
            format!(
                "{} needs at least {min} legs, got {n}",
                cfg.level.type_name()
            ),
        ));
    }
    if cfg.level != Level::Raid1 {
        let c = cfg.chunk.0;
        if c < 8 || !c.is_power_of_two() || c > MAX_CHUNK_SECTORS {
            return Err(ArgError::at(
                3,
                format!(
                    "chunk_size {c} must be a power of two of at least 8 and at most \
                     {MAX_CHUNK_SECTORS} sectors"
                ),
            ));
        }
    }
    if let Some(r) = cfg.region {
        if r.0 == 0 || !r.0.is_power_of_two() {
            return Err(ArgError::whole(format!(
                "region_size {} must be a power of two number of sectors",
                r.0
            )));
        }
    }
    if cfg.max_recovery_kib > MAX_RECOVERY_KIB {
        return Err(ArgError::whole(format!(
            "max_recovery_rate {} KiB/s is above {MAX_RECOVERY_KIB}",
            cfg.max_recovery_kib
        )));
    }
    if !cfg.mirror {
        // Two legs on one device would hold each other's blocks: no redundancy, and resync
        // would copy over data. (Mirror legs may share a device at disjoint offsets; the
        // sizing checks those.)
        let mut seen: Vec<(&str, usize)> = Vec::new();
        for (i, l) in cfg.legs.iter().enumerate() {
            for name in [&l.meta, &l.data].into_iter().flatten() {
                if let Some((_, j)) = seen.iter().find(|(s, _)| *s == name.as_str()) {
                    return Err(ArgError::at(
                        devs_arg,
                        format!("leg {i} names '{name}', which leg {j} uses already"),
                    ));
                }
                seen.push((name, i));
            }
        }
    }
    for &r in &cfg.rebuild {
        if r >= n {
            return Err(ArgError::whole(format!(
                "rebuild {r}: only {n} legs (0-based)"
            )));
        }
        if cfg.legs[r].data.is_none() {
            return Err(ArgError::whole(format!(
                "rebuild {r}: leg {r} is missing ('- -'): there is no device to rebuild; \
                 give one in the table, or send 'rebuild {r} <device>'"
            )));
        }
    }
    let missing: Vec<usize> = (0..n).filter(|&i| cfg.legs[i].data.is_none()).collect();
    if !cfg.level.tolerates(n, |i| missing.contains(&i)) {
        return Err(ArgError::at(
            devs_arg,
            format!(
                "legs {missing:?} are missing ('- -'): too many for a {n}-leg {}, some data \
                 would have no copy",
                cfg.level.type_name()
            ),
        ));
    }
    if !cfg
        .level
        .tolerates(n, |i| cfg.rebuild.contains(&i) || missing.contains(&i))
    {
        return Err(ArgError::whole(format!(
            "cannot rebuild legs {:?} of a {n}-leg {}{} at once: some data would have no \
             copy left to rebuild from",
            cfg.rebuild,
            cfg.level.type_name(),
            if missing.is_empty() {
                String::new()
            } else {
                format!(" with legs {missing:?} missing")
            }
        )));
    }
    Ok(())
}

/// Parses a dm-mirror line: `core <#log_args> <region_size> [[no]sync] <#devs> (<dev>
/// <offset>)... [<#features> handle_errors]`.
pub fn parse_mirror(args: &[String]) -> Result<RaidConfig, ArgError> {
    let log = args
        .first()
        .ok_or_else(|| ArgError::whole("missing log type"))?;
    if log != "core" {
        return Err(ArgError::at(
            1,
            format!(
                "log type '{log}' not supported; use 'core' or a raid1 line with metadata devices"
            ),
        ));
    }
    let nlog = num(args, 1, "#log_args")? as usize;
    if !(1..=2).contains(&nlog) {
        return Err(ArgError::at(
            2,
            "core log takes 1 or 2 arguments: <region_size> [[no]sync]",
        ));
    }
    let region = num(args, 2, "region_size")?;
    if region == 0 || !region.is_power_of_two() {
        return Err(ArgError::at(
            3,
            format!("region_size {region} must be a power of two"),
        ));
    }
    let mut sync = SyncMode::Default;
    if nlog == 2 {
        sync = match args.get(3).map(String::as_str) {
            Some("sync") => SyncMode::Force,
            Some("nosync") => SyncMode::Skip,
            other => {
                return Err(ArgError::at(
                    4,
                    format!("expected sync or nosync, got '{}'", other.unwrap_or("")),
                ))
            }
        };
    }
    let di = 2 + nlog;
    let ndev = num(args, di, "#devs")?;
    let end = match ndev
        .checked_mul(2)
        .and_then(|d| d.checked_add(di as u64 + 1))
    {
        Some(e) if e <= args.len() as u64 => e as usize,
        _ => {
            return Err(ArgError::at(
                di + 1,
                format!(
                    "#devs is {ndev} but fewer than {} device/offset arguments follow",
                    ndev as u128 * 2
                ),
            ))
        }
    };
    let mut legs = Vec::new();
    for (j, p) in args[di + 1..end].chunks(2).enumerate() {
        let off = p[1].parse::<u64>().map_err(|_| {
            ArgError::at(di + 3 + 2 * j, format!("offset '{}' is not a number", p[1]))
        })?;
        legs.push(LegSpec {
            meta: None,
            data: Some(p[0].clone()),
            offset: Sectors(off),
        });
    }
    let rest = &args[end..];
    if !rest.is_empty() {
        let nfeat = num(args, end, "#features")?;
        if rest.len() as u64 - 1 != nfeat {
            return Err(ArgError::at(
                end + 1,
                "feature count does not match the features given",
            ));
        }
        for (j, f) in rest[1..].iter().enumerate() {
            if f != "handle_errors" && f != "keep_log" {
                return Err(ArgError::at(
                    end + 2 + j,
                    format!("unknown mirror feature '{f}'"),
                ));
            }
        }
    }
    let cfg = RaidConfig {
        level: Level::Raid1,
        chunk: Sectors(0),
        region: Some(Sectors(region)),
        rebuild: Vec::new(),
        sync,
        max_recovery_kib: 0,
        legs,
        mirror: true,
    };
    check_common(&cfg, di + 1)?;
    Ok(cfg)
}

impl RaidConfig {
    /// Runs every check of the parsed values that needs no device (the parsers run it too);
    /// for configurations built in code.
    pub fn check(&self) -> Result<(), ArgError> {
        check_common(self, 0).map_err(|e| ArgError::whole(e.msg))
    }

    /// The canonical argument list (as `dmsetup table` would print it).
    pub fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.mirror {
            out.push("core".to_string());
            let mut log = vec![self.region.unwrap_or(Sectors(1024)).0.to_string()];
            match self.sync {
                SyncMode::Force => log.push("sync".into()),
                SyncMode::Skip => log.push("nosync".into()),
                SyncMode::Default => {}
            }
            out.push(log.len().to_string());
            out.extend(log);
            out.push(self.legs.len().to_string());
            for l in &self.legs {
                out.push(l.data.clone().unwrap_or_else(|| "-".into()));
                out.push(l.offset.0.to_string());
            }
            return out;
        }
        out.push(self.level.type_name().to_string());
        let mut p = vec![self.chunk.0.to_string()];
        match self.sync {
            SyncMode::Force => p.push("sync".into()),
            SyncMode::Skip => p.push("nosync".into()),
            SyncMode::Default => {}
        }
        for r in &self.rebuild {
            p.push("rebuild".into());
            p.push(r.to_string());
        }
        if let Some(r) = self.region {
            p.push("region_size".into());
            p.push(r.0.to_string());
        }
        if self.max_recovery_kib != 0 {
            p.push("max_recovery_rate".into());
            p.push(self.max_recovery_kib.to_string());
        }
        if let Level::Raid10 { copies } = self.level {
            p.push("raid10_copies".into());
            p.push(copies.to_string());
            p.push("raid10_format".into());
            p.push("near".into());
        }
        out.push(p.len().to_string());
        out.extend(p);
        out.push(self.legs.len().to_string());
        for l in &self.legs {
            out.push(l.meta.clone().unwrap_or_else(|| "-".into()));
            out.push(l.data.clone().unwrap_or_else(|| "-".into()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_raid5_and_normalizes() {
        let c = parse_raid(&a("raid5 3 128 region_size 1024 4 m0 d0 m1 d1 m2 d2 m3 d3")).unwrap();
        assert_eq!(c.level, Level::Raid5(Raid5Layout::LeftSymmetric));
        assert_eq!(c.region, Some(Sectors(1024)));
        assert_eq!(
            c.to_args().join(" "),
            "raid5_ls 3 128 region_size 1024 4 m0 d0 m1 d1 m2 d2 m3 d3"
        );
        let again = parse_raid(&c.to_args()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn rejects_bad_lines_with_positions() {
        let e = parse_raid(&a("raid5 1 100 3 - a - b - c")).unwrap_err();
        assert_eq!(e.arg, Some(3));
        let e = parse_raid(&a("raid6 1 128 4 - a - b - c - d")).unwrap_err();
        assert_eq!(e.arg, Some(1));
        let e = parse_raid(&a("raid1 1 0 2 - a")).unwrap_err();
        assert!(e.msg.contains("#raid_devs"), "{e}");
        let e = parse_raid(&a("raid1 1 0 2 m0 a - b")).unwrap_err();
        assert!(e.msg.contains("metadata"), "{e}");
        let e = parse_raid(&a("raid5 3 128 journal_dev j 3 - a - b - c")).unwrap_err();
        assert!(e.msg.contains("write hole"), "{e}");
        assert!(parse_raid(&a("raid5 3 128 rebuild 0 rebuild 1 3 - a - b - c")).is_err());
    }

    #[test]
    fn parses_raid10_and_mirror() {
        let c = parse_raid(&a(
            "raid10 5 64 raid10_copies 3 raid10_format near 3 - a - b - c",
        ))
        .unwrap();
        assert_eq!(c.level, Level::Raid10 { copies: 3 });
        let m = parse_mirror(&a("core 2 1024 nosync 2 /a 0 /b 2048 1 handle_errors")).unwrap();
        assert_eq!(m.legs[1].offset, Sectors(2048));
        assert_eq!(m.sync, SyncMode::Skip);
        assert_eq!(m.to_args().join(" "), "core 2 1024 nosync 2 /a 0 /b 2048");
        assert!(parse_mirror(&a("disk 2 /log 1024 2 /a 0 /b 0")).is_err());
    }
}
