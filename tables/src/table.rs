//! The device-mapper table text format: one segment per line, `start length target args...`,
//! in 512-byte sectors, exactly what `dmsetup table` prints and `dmsetup create` reads.
//!
//! [`Table::parse`] checks the structure (ascending, contiguous segments from sector 0, no
//! zero lengths, numbers that fit) and each target's arguments through its
//! [`TargetKind`](crate::registry::TargetKind), and reports the first problem with its line,
//! field and field name. [`Table::build`] opens the devices and returns the whole table as one
//! [`Mapped`] device.

use std::fmt;
use std::sync::Arc;

use crate::io::DeviceRef;
use crate::registry::{ArgError, BuildCtx, Registry, Resolver};
use crate::targets::mapped::{Mapped, MappedSegment};
use crate::units::Sectors;

/// One line of a table: `start length target args...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// 1-based line of the text this came from (0 if built programmatically).
    pub line: usize,
    /// First sector of the segment in the mapped device.
    pub start: Sectors,
    /// Length in sectors (never zero).
    pub len: Sectors,
    /// Target type name (`linear`).
    pub target: String,
    /// Target arguments, in their normalized form once parsed.
    pub args: Vec<String>,
}

impl Segment {
    /// One past the last sector of the segment.
    pub fn end(&self) -> Sectors {
        Sectors(self.start.0.saturating_add(self.len.0))
    }
}

/// A device named by a table line ([`Table::devices`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceArg {
    /// 1-based line of the table text.
    pub line: usize,
    /// 0-based index into that line's target arguments.
    pub arg: usize,
    /// The device as the table names it.
    pub name: String,
}

/// A parsed, validated table.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    /// Segments in ascending order, contiguous from sector 0.
    pub segments: Vec<Segment>,
}

/// Why a table is wrong: where (line, field) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct TableError {
    /// 1-based line number; 0 for the table as a whole (empty table).
    pub line: usize,
    /// 1-based field index (1 = start, 2 = length, 3 = target, 4.. = target arguments), or
    /// `None` when the problem is the line (or table) as a whole.
    pub field: Option<usize>,
    /// Human name of the field (`start`, `chunk size`), when known.
    pub field_name: Option<String>,
    /// What is wrong.
    pub msg: String,
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "table")?;
        } else {
            write!(f, "line {}", self.line)?;
        }
        if let Some(field) = self.field {
            write!(f, ", field {field}")?;
            if let Some(name) = &self.field_name {
                write!(f, " ({name})")?;
            }
        }
        write!(f, ": {}", self.msg)
    }
}

impl TableError {
    /// An error about a whole line.
    pub fn line(line: usize, msg: impl Into<String>) -> TableError {
        TableError {
            line,
            field: None,
            field_name: None,
            msg: msg.into(),
        }
    }

    /// An error about one field of a line.
    pub fn field(
        line: usize,
        field: usize,
        name: impl Into<String>,
        msg: impl Into<String>,
    ) -> TableError {
        TableError {
            line,
            field: Some(field),
            field_name: Some(name.into()),
            msg: msg.into(),
        }
    }

    /// Converts a target's argument error on `line` into a table error (field = 3 + arg).
    pub fn from_arg(
        line: usize,
        kind: &dyn crate::registry::TargetKind,
        args: &[String],
        e: ArgError,
    ) -> TableError {
        match e.arg {
            Some(a) => TableError {
                line,
                field: Some(3 + a),
                field_name: Some(
                    kind.arg_name(args, a)
                        .unwrap_or_else(|| format!("{} argument {a}", kind.name())),
                ),
                msg: e.msg,
            },
            None => TableError::line(line, format!("{}: {}", kind.name(), e.msg)),
        }
    }
}

const FIELD_NAMES: [&str; 3] = ["start", "length", "target"];

/// Parses a decimal sector count the way the table format allows: digits only (leading zeros
/// fine), no sign, must fit in 64 bits. The error quotes the text.
pub fn parse_sectors(text: &str) -> Result<Sectors, String> {
    parse_decimal(text).map(Sectors)
}

/// Parses an unsigned decimal number (digits only); errors quote the text and say what is wrong.
pub fn parse_decimal(text: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err("empty number".to_string());
    }
    if let Some(rest) = text.strip_prefix('-') {
        if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("'{text}' is negative"));
        }
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("'{text}' is not a number"));
    }
    text.parse::<u64>()
        .map_err(|_| format!("'{text}' is too large (more than 64 bits)"))
}

/// Splits one line into its fields, dropping a `#` comment (whole-line or trailing).
fn fields(line: &str) -> Vec<&str> {
    let content = match line.find('#') {
        Some(i) => &line[..i],
        None => line,
    };
    content.split_whitespace().collect()
}

impl Table {
    /// Parses and validates table text against the target kinds in `reg`.
    pub fn parse(text: &str, reg: &Registry) -> Result<Table, TableError> {
        let mut segments: Vec<Segment> = Vec::new();
        for (idx, raw) in text.lines().enumerate() {
            let line = idx + 1;
            let f = fields(raw);
            if f.is_empty() {
                continue;
            }
            if f.len() < 3 {
                let missing = f.len() + 1;
                return Err(TableError::field(
                    line,
                    missing,
                    FIELD_NAMES[missing - 1],
                    format!(
                        "missing {} (a line is 'start length target args...')",
                        FIELD_NAMES[missing - 1]
                    ),
                ));
            }
            let start = parse_sectors(f[0]).map_err(|m| TableError::field(line, 1, "start", m))?;
            let len = parse_sectors(f[1]).map_err(|m| TableError::field(line, 2, "length", m))?;
            if len.0 == 0 {
                return Err(TableError::field(line, 2, "length", "zero-length segment"));
            }
            let end = start.checked_add(len).ok_or_else(|| {
                TableError::field(
                    line,
                    2,
                    "length",
                    format!("segment end {start} + {len} overflows 64 bits"),
                )
            })?;
            // dm sizes are also bounded by the byte size fitting in 64 bits.
            if end.0.checked_mul(crate::units::SECTOR_SIZE).is_none() {
                return Err(TableError::field(
                    line,
                    2,
                    "length",
                    format!("segment end {end} sectors overflows 64 bits in bytes"),
                ));
            }
            match segments.last() {
                None if start.0 != 0 => {
                    return Err(TableError::field(
                        line,
                        1,
                        "start",
                        format!(
                            "the first segment must start at sector 0, not {start} (sectors 0..{start} would be unmapped)"
                        ),
                    ))
                }
                None => {}
                Some(prev) => {
                    let pend = prev.end();
                    if start < prev.start {
                        return Err(TableError::field(
                            line,
                            1,
                            "start",
                            format!(
                                "segments out of order: starts at {start}, before the segment on line {} (starting at {}); lines must be in ascending order",
                                prev.line, prev.start
                            ),
                        ));
                    }
                    if start < pend {
                        return Err(TableError::field(
                            line,
                            1,
                            "start",
                            format!(
                                "overlaps the segment on line {} ({}..{}): starts at {start}",
                                prev.line, prev.start, pend
                            ),
                        ));
                    }
                    if start > pend {
                        return Err(TableError::field(
                            line,
                            1,
                            "start",
                            format!(
                                "gap: sectors {pend}..{start} are not mapped (the segment on line {} ends at {pend})",
                                prev.line
                            ),
                        ));
                    }
                }
            }
            let target = f[2];
            let kind = reg.get(target).ok_or_else(|| {
                TableError::field(
                    line,
                    3,
                    "target",
                    format!(
                        "unknown target '{target}' (known: {})",
                        reg.names().join(", ")
                    ),
                )
            })?;
            let args: Vec<String> = f[3..].iter().map(|s| s.to_string()).collect();
            kind.validate(len, &args)
                .map_err(|e| TableError::from_arg(line, kind.as_ref(), &args, e))?;
            let args = kind.normalize(&args);
            segments.push(Segment {
                line,
                start,
                len,
                target: target.to_string(),
                args,
            });
        }
        if segments.is_empty() {
            return Err(TableError::line(
                0,
                "no segments (the table is empty or only comments)",
            ));
        }
        Ok(Table { segments })
    }

    /// Every device the table names, in line order: where (line, 0-based argument index) and
    /// the name as written. A line whose target `reg` does not know names none.
    pub fn devices(&self, reg: &Registry) -> Vec<DeviceArg> {
        let mut out = Vec::new();
        for s in &self.segments {
            let Some(kind) = reg.get(&s.target) else {
                continue;
            };
            for arg in kind.device_args(&s.args) {
                if let Some(name) = s.args.get(arg) {
                    out.push(DeviceArg {
                        line: s.line,
                        arg,
                        name: name.clone(),
                    });
                }
            }
        }
        out
    }

    /// Rewrites every device name through `f` (which may fail, naming the device), leaving
    /// every other argument as it is: relative paths made absolute, aliases made canonical.
    pub fn map_devices<E>(
        &mut self,
        reg: &Registry,
        mut f: impl FnMut(&str) -> Result<String, E>,
    ) -> Result<(), E> {
        for s in &mut self.segments {
            let Some(kind) = reg.get(&s.target) else {
                continue;
            };
            for arg in kind.device_args(&s.args) {
                if let Some(a) = s.args.get_mut(arg) {
                    *a = f(a)?;
                }
            }
        }
        Ok(())
    }

    /// This table with every device `gone` says is unusable left out, if each line that names
    /// one can run without it ([`TargetKind::without_devices`](crate::registry::TargetKind::without_devices)); `None` if some line cannot
    /// (or no line names such a device). The lengths and the other arguments are unchanged.
    pub fn without_devices(&self, reg: &Registry, gone: impl Fn(&str) -> bool) -> Option<Table> {
        let mut out = self.clone();
        let mut changed = false;
        for s in &mut out.segments {
            let kind = reg.get(&s.target)?;
            let idx: Vec<usize> = kind
                .device_args(&s.args)
                .into_iter()
                .filter(|&i| s.args.get(i).is_some_and(|a| gone(a)))
                .collect();
            if idx.is_empty() {
                continue;
            }
            s.args = kind.without_devices(&s.args, &idx)?;
            kind.validate(s.len, &s.args).ok()?;
            changed = true;
        }
        changed.then_some(out)
    }

    /// Total size: one past the last mapped sector.
    pub fn size(&self) -> Sectors {
        self.segments
            .last()
            .map(|s| s.end())
            .unwrap_or(Sectors::ZERO)
    }

    /// Builds every segment's target and returns the table as one device named `table`.
    pub fn build(&self, reg: &Registry, resolver: &dyn Resolver) -> Result<DeviceRef, TableError> {
        self.build_named("table", reg, resolver)
    }

    /// Like [`build`](Self::build), naming the resulting device `name` (used in I/O errors).
    pub fn build_named(
        &self,
        name: &str,
        reg: &Registry,
        resolver: &dyn Resolver,
    ) -> Result<DeviceRef, TableError> {
        let mut segs = Vec::with_capacity(self.segments.len());
        for s in &self.segments {
            let kind = reg.get(&s.target).ok_or_else(|| {
                TableError::field(
                    s.line,
                    3,
                    "target",
                    format!(
                        "unknown target '{}' (known: {})",
                        s.target,
                        reg.names().join(", ")
                    ),
                )
            })?;
            let ctx = BuildCtx {
                line: s.line,
                len: s.len,
                resolver,
            };
            let dev = kind
                .build(&ctx, &s.args)
                .map_err(|e| TableError::from_arg(s.line, kind.as_ref(), &s.args, e))?;
            segs.push(MappedSegment {
                line: s.line,
                start: s.start,
                len: s.len,
                target: s.target.clone(),
                dev,
            });
        }
        let m = Mapped::new(name, segs).map_err(|(line, msg)| TableError::line(line, msg))?;
        Ok(Arc::new(m))
    }
}

/// Prints the normalized table: one line per segment, single-spaced, no comments.
impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for s in &self.segments {
            write!(f, "{} {} {}", s.start, s.len, s.target)?;
            for a in &s.args {
                write!(f, " {a}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
