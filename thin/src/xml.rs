//! thin-provisioning-tools' XML metadata format (`thin_dump` writes it, `thin_restore` reads
//! it), so pools move between kernel dm-thin and ours:
//!
//! ```text
//! <superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="1024">
//!   <device dev_id="1" mapped_blocks="4" transaction="0" creation_time="0" snap_time="0">
//!     <range_mapping origin_begin="0" data_begin="10" length="3" time="0"/>
//!     <single_mapping origin_block="100" data_block="500" time="0"/>
//!   </device>
//! </superblock>
//! ```
//!
//! `data_block_size` is in 512-byte sectors; every other number counts data blocks (origin
//! blocks are a thin device's virtual blocks, data blocks are the pool's). Data block `d`
//! lives at byte `d * data_block_size * 512` of the data device, in dm-thin as in ours, so
//! the data device moves across unchanged.
//!
//! [`to_xml`] writes what thin-provisioning-tools 0.9's `thin_dump` writes, element for
//! element and attribute for attribute. Our metadata keeps no uuid, no times, no flags and no
//! per-device transaction ids: those are written as `thin_dump` writes them for a pool that
//! never had them (`uuid=""`, times, `flags` and device `transaction` 0), and `version` is
//! dm-thin's metadata version 2.
//!
//! [`from_xml`] reads what `thin_dump` writes (0.9 and later, without the shared subtree
//! `<def>`/`<ref>` elements of 1.x). It needs the attributes `thin_restore` needs and checks
//! every number, then keeps what a [`Dump`] records:
//! - kept: the transaction id, block size, data block count, device ids and every mapping;
//! - dropped: `uuid`, `time`, `flags`, `version`, `metadata_snap` (a held metadata snapshot
//!   is not carried over), each device's `transaction`, `creation_time` and `snap_time`,
//!   and each mapping's `time`;
//! - not recorded in either direction: sharing between snapshots. A restore
//!   ([`crate::tools::restore`]) gives each device its own mapping tree, each mapping being
//!   its own reference to its data block (a block two snapshots share gets a count of 2);
//!   the data device is the same either way.
//!
//! What [`from_xml`] refuses, with the line, the element and the attribute: XML that is not
//! well-formed, a DOCTYPE, processing instructions, CDATA or text, unknown elements or
//! attributes, misplaced or missing ones, numbers that are not plain decimals of their type,
//! a block size our pools cannot use (a power of two from 8 to 2097152 sectors), more data
//! blocks than a pool may have, a mapping of length 0, one that runs past the pool's data
//! blocks or past the largest virtual address, two mappings of one device that overlap, a
//! device id given twice, and a device whose `mapped_blocks` is not the number of blocks its
//! mappings cover (a cut or edited file). Nothing is allocated from a number in the file:
//! memory grows with the file's length only.
//!
//! The result is canonical: devices in id order, each device's mappings in virtual block
//! order with consecutive ones merged into runs (as [`crate::tools::dump`] makes them), so a
//! dump of metadata restored from it equals it.

use std::collections::BTreeMap;
use std::fmt;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use crate::disk::superblock::{vblock_limit, MAX_DATA_BLOCKS};
use crate::tools::{Dump, DumpDevice, DumpRun};
use crate::types::{DataBlock, ThinId, VBlock};

/// The superblock `version` written: dm-thin's current metadata format.
const METADATA_VERSION: u32 = 2;

/// The [`Dump::version`] of a dump read from XML (the version of our dump layout).
const DUMP_VERSION: u32 = 1;

/// Longest value or name quoted in an error (a hostile file may hold megabytes in one).
const QUOTE_MAX: usize = 40;

/// Writes `dump` as `thin_dump` (thin-provisioning-tools 0.9) writes metadata: one element a
/// line, indented by two spaces, a run of one block as a `<single_mapping>`.
pub fn to_xml(dump: &Dump) -> String {
    XmlDump(dump).to_string()
}

struct XmlDump<'a>(&'a Dump);

impl fmt::Display for XmlDump<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        writeln!(
            f,
            r#"<superblock uuid="" time="0" transaction="{}" flags="0" version="{METADATA_VERSION}" data_block_size="{}" nr_data_blocks="{}">"#,
            d.transaction_id, d.data_block_sectors, d.nr_data_blocks
        )?;
        for dev in &d.devices {
            writeln!(
                f,
                r#"  <device dev_id="{}" mapped_blocks="{}" transaction="0" creation_time="0" snap_time="0">"#,
                dev.id.0, dev.mapped_blocks
            )?;
            for r in &dev.mappings {
                if r.len == 1 {
                    writeln!(
                        f,
                        r#"    <single_mapping origin_block="{}" data_block="{}" time="0"/>"#,
                        r.vblock.0, r.dblock.0
                    )?;
                } else {
                    writeln!(
                        f,
                        r#"    <range_mapping origin_begin="{}" data_begin="{}" length="{}" time="0"/>"#,
                        r.vblock.0, r.dblock.0, r.len
                    )?;
                }
            }
            writeln!(f, "  </device>")?;
        }
        writeln!(f, "</superblock>")
    }
}

/// Why [`from_xml`] refused a document, and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {kind}")]
pub struct XmlError {
    /// Line of the offending element or text (from 1).
    pub line: u64,
    /// Its column in bytes (from 1).
    pub column: u64,
    /// What is wrong.
    pub kind: XmlErrorKind,
}

/// What [`from_xml`] found wrong. Names and values from the file are quoted shortened.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XmlErrorKind {
    /// Not well-formed XML (the parser's message).
    #[error("not well-formed XML: {0}")]
    Syntax(String),
    /// Markup thin_dump never writes (a DOCTYPE, processing instruction, CDATA).
    #[error("{0} is not allowed in a thin_dump file")]
    Markup(&'static str),
    /// Text other than white space between elements.
    #[error("unexpected text {0:?} (a thin_dump file holds only elements)")]
    Text(String),
    /// An element thin_dump does not write.
    #[error("unknown element <{0}> (a thin_dump file holds superblock, device, range_mapping and single_mapping)")]
    UnknownElement(String),
    /// `<def>`/`<ref>`: shared mapping subtrees, which thin-provisioning-tools 1.x may write.
    #[error("<{0}> (a shared mapping subtree, which thin-provisioning-tools 1.x writes for snapshots) is not supported: dump the metadata with thin_dump 0.9, which writes every mapping out")]
    SharedSubtree(String),
    /// A known element in the wrong place (`place` says where it was).
    #[error("<{element}> is not allowed {place}")]
    Misplaced {
        /// The element.
        element: &'static str,
        /// Where it was, e.g. `inside <device>`.
        place: String,
    },
    /// An attribute the element does not have.
    #[error("<{element}>: unknown attribute {attribute:?}")]
    UnknownAttribute {
        /// The element.
        element: &'static str,
        /// The attribute's name.
        attribute: String,
    },
    /// An attribute the element needs (thin_restore needs it too).
    #[error("<{element}>: attribute {attribute} is missing")]
    MissingAttribute {
        /// The element.
        element: &'static str,
        /// The attribute.
        attribute: &'static str,
    },
    /// An attribute whose value is not acceptable.
    #[error("<{element} {attribute}=\"{value}\">: {why}")]
    BadValue {
        /// The element.
        element: &'static str,
        /// The attribute.
        attribute: &'static str,
        /// Its value, shortened.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A device id given twice.
    #[error("<device dev_id=\"{dev_id}\"> appears twice (first on line {first_line})")]
    DuplicateDevice {
        /// The id.
        dev_id: u32,
        /// Line of its first `<device>`.
        first_line: u64,
    },
    /// Two mappings of one device cover the same virtual block.
    #[error("device {dev_id}: virtual block {vblock} is mapped here and by the mapping on line {other_line}")]
    Overlap {
        /// The device.
        dev_id: u32,
        /// The first virtual block both cover.
        vblock: u64,
        /// Line of the other mapping.
        other_line: u64,
    },
    /// A device's `mapped_blocks` differs from what its mappings cover.
    #[error("device {dev_id}: mapped_blocks=\"{stated}\" but its mappings cover {found} blocks (a cut or edited file?)")]
    MappedCount {
        /// The device.
        dev_id: u32,
        /// Its `mapped_blocks`.
        stated: u64,
        /// Blocks its mappings cover.
        found: u64,
    },
    /// No `<superblock>` at all.
    #[error("no <superblock> element (not a thin_dump file)")]
    NoSuperblock,
    /// The document ends before the element closes.
    #[error("the document ends inside <{0}>")]
    Unterminated(&'static str),
}

/// Reads a `thin_dump` XML document into a canonical [`Dump`] (see the module docs for what
/// is kept, what is dropped and what is refused).
pub fn from_xml(text: &str) -> Result<Dump, XmlError> {
    // A byte order mark is not markup; positions count from after it.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut p = Parser {
        text,
        open: Vec::new(),
        sb: None,
        devices: Vec::new(),
        seen: BTreeMap::new(),
        cur: None,
    };
    let mut reader = Reader::from_str(text);
    // `<x/>` arrives as a start and an end, so the two spellings are one case.
    reader.config_mut().expand_empty_elements = true;
    loop {
        let pos = reader.buffer_position();
        let ev = match reader.read_event() {
            Ok(ev) => ev,
            Err(e) => {
                return Err(p.err(
                    reader.error_position(),
                    XmlErrorKind::Syntax(shorten(&e.to_string(), 200)),
                ))
            }
        };
        let r = match ev {
            Event::Start(e) => p.start(&e, pos),
            // Not produced with `expand_empty_elements`, but the same thing.
            Event::Empty(e) => {
                p.start(&e, pos).map_err(|k| p.err(pos, k))?;
                p.end()?;
                Ok(())
            }
            Event::End(_) => {
                p.end()?;
                Ok(())
            }
            Event::Text(t) if t.trim_ascii().is_empty() => Ok(()),
            Event::Text(t) => Err(XmlErrorKind::Text(shorten(t.trim_ascii(), QUOTE_MAX))),
            Event::GeneralRef(_) => Err(XmlErrorKind::Text("&...;".into())),
            Event::Comment(_) | Event::Decl(_) => Ok(()),
            Event::CData(_) => Err(XmlErrorKind::Markup("CDATA")),
            Event::PI(_) => Err(XmlErrorKind::Markup("a processing instruction")),
            Event::DocType(_) => Err(XmlErrorKind::Markup("a DOCTYPE")),
            Event::Eof => break,
        };
        r.map_err(|k| p.err(pos, k))?;
    }
    let end = text.len() as u64;
    if let Some(o) = p.open.last() {
        return Err(p.err(end, XmlErrorKind::Unterminated(o.name())));
    }
    let Some(sb) = p.sb else {
        return Err(p.err(end, XmlErrorKind::NoSuperblock));
    };
    p.devices.sort_by_key(|d| d.id);
    Ok(Dump {
        version: DUMP_VERSION,
        data_block_sectors: sb.data_block_sectors,
        nr_data_blocks: sb.nr_data_blocks,
        transaction_id: sb.transaction_id,
        devices: p.devices,
    })
}

/// An element being read.
#[derive(Clone, Copy)]
enum Open {
    Superblock,
    Device,
    Mapping(&'static str),
}

impl Open {
    fn name(self) -> &'static str {
        match self {
            Open::Superblock => "superblock",
            Open::Device => "device",
            Open::Mapping(n) => n,
        }
    }
}

struct Superblock {
    data_block_sectors: u32,
    nr_data_blocks: u64,
    transaction_id: u64,
}

/// The device being read: its mappings with the byte position of each element.
struct CurrentDevice {
    id: ThinId,
    mapped_blocks: u64,
    pos: u64,
    runs: Vec<(DumpRun, u64)>,
}

struct Parser<'t> {
    text: &'t str,
    open: Vec<Open>,
    sb: Option<Superblock>,
    devices: Vec<DumpDevice>,
    /// Device ids seen, with the position of their `<device>`.
    seen: BTreeMap<ThinId, u64>,
    cur: Option<CurrentDevice>,
}

impl Parser<'_> {
    /// Line and column (from 1) of byte `pos`.
    fn locate(&self, pos: u64) -> (u64, u64) {
        let pos = usize::try_from(pos)
            .unwrap_or(usize::MAX)
            .min(self.text.len());
        let before = &self.text.as_bytes()[..pos];
        let line = before.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        (line, (pos - line_start) as u64 + 1)
    }

    fn err(&self, pos: u64, kind: XmlErrorKind) -> XmlError {
        let (line, column) = self.locate(pos);
        XmlError { line, column, kind }
    }

    fn start(&mut self, e: &BytesStart<'_>, pos: u64) -> Result<(), XmlErrorKind> {
        let name = e.name();
        let element = match name.as_ref() {
            "superblock" => "superblock",
            "device" => "device",
            "range_mapping" => "range_mapping",
            "single_mapping" => "single_mapping",
            n @ ("def" | "ref") => return Err(XmlErrorKind::SharedSubtree(n.into())),
            n => return Err(XmlErrorKind::UnknownElement(shorten(n, QUOTE_MAX))),
        };
        let parent = self.open.last().copied();
        let expected = match element {
            "superblock" => None,
            "device" => Some("superblock"),
            _ => Some("device"),
        };
        let misplaced = |place: String| XmlErrorKind::Misplaced { element, place };
        match (parent, expected) {
            (None, None) if self.sb.is_some() => {
                return Err(misplaced("twice (one <superblock> per file)".into()))
            }
            (None, None) => {}
            (Some(p), Some(want)) if p.name() == want => {}
            (Some(p), _) => return Err(misplaced(format!("inside <{}>", p.name()))),
            (None, Some(want)) => return Err(misplaced(format!("outside <{want}>"))),
        }
        match element {
            "superblock" => {
                self.sb = Some(superblock(e)?);
                self.open.push(Open::Superblock);
            }
            "device" => {
                let (id, mapped_blocks) = device(e)?;
                if let Some(&first) = self.seen.get(&id) {
                    return Err(XmlErrorKind::DuplicateDevice {
                        dev_id: id.0,
                        first_line: self.locate(first).0,
                    });
                }
                self.seen.insert(id, pos);
                self.cur = Some(CurrentDevice {
                    id,
                    mapped_blocks,
                    pos,
                    runs: Vec::new(),
                });
                self.open.push(Open::Device);
            }
            _ => {
                let Some(sb) = &self.sb else {
                    return Err(misplaced("outside <superblock>".into()));
                };
                let run = mapping(e, element, sb)?;
                if let Some(c) = self.cur.as_mut() {
                    c.runs.push((run, pos));
                }
                self.open.push(Open::Mapping(element));
            }
        }
        Ok(())
    }

    fn end(&mut self) -> Result<(), XmlError> {
        // quick-xml checks that end tags match their start tags.
        if let Some(Open::Device) = self.open.pop() {
            if let Some(c) = self.cur.take() {
                let d = self.finish_device(c)?;
                self.devices.push(d);
            }
        }
        Ok(())
    }

    /// Sorts a device's mappings, refuses overlaps and a wrong count, merges runs.
    fn finish_device(&self, c: CurrentDevice) -> Result<DumpDevice, XmlError> {
        let mut runs = c.runs;
        runs.sort_by_key(|(r, _)| r.vblock);
        let mut found = 0u64;
        let mut out: Vec<DumpRun> = Vec::new();
        let mut prev: Option<(u64, u64)> = None; // (end of the previous run, its position)
        for (r, pos) in runs {
            if let Some((prev_end, prev_pos)) = prev {
                if r.vblock.0 < prev_end {
                    let kind = XmlErrorKind::Overlap {
                        dev_id: c.id.0,
                        vblock: r.vblock.0,
                        other_line: self.locate(prev_pos).0,
                    };
                    // Report the later of the two in the file.
                    return Err(self.err(pos.max(prev_pos), kind));
                }
            }
            // Checked when the mapping was read: it ends inside the virtual address space.
            let end = r.vblock.0.saturating_add(r.len);
            prev = Some((end, pos));
            found = found.saturating_add(r.len);
            match out.last_mut() {
                Some(l)
                    if l.vblock.0.checked_add(l.len) == Some(r.vblock.0)
                        && l.dblock.0.checked_add(l.len) == Some(r.dblock.0) =>
                {
                    // Cannot saturate: both lie inside the virtual address space.
                    l.len = l.len.saturating_add(r.len);
                }
                _ => out.push(r),
            }
        }
        if found != c.mapped_blocks {
            return Err(self.err(
                c.pos,
                XmlErrorKind::MappedCount {
                    dev_id: c.id.0,
                    stated: c.mapped_blocks,
                    found,
                },
            ));
        }
        Ok(DumpDevice {
            id: c.id,
            mapped_blocks: c.mapped_blocks,
            mappings: out,
        })
    }
}

/// An element's attributes, by name, as the element's table lists them.
struct Attrs<'a> {
    element: &'static str,
    names: &'static [&'static str],
    values: Vec<Option<std::borrow::Cow<'a, str>>>,
}

impl<'a> Attrs<'a> {
    /// Reads `e`'s attributes; refuses any not in `names`, and repeats.
    fn read(
        e: &'a BytesStart<'a>,
        element: &'static str,
        names: &'static [&'static str],
    ) -> Result<Attrs<'a>, XmlErrorKind> {
        let mut values = vec![None; names.len()];
        for a in e.attributes() {
            let a = a.map_err(|err| XmlErrorKind::Syntax(format!("<{element}>: {err}")))?;
            let key = a.key.as_ref();
            let Some(i) = names.iter().position(|n| *n == key) else {
                return Err(XmlErrorKind::UnknownAttribute {
                    element,
                    attribute: shorten(key, QUOTE_MAX),
                });
            };
            values[i] = Some(a.value);
        }
        Ok(Attrs {
            element,
            names,
            values,
        })
    }

    fn raw(&self, name: &'static str) -> Option<&str> {
        let i = self.names.iter().position(|n| *n == name)?;
        self.values.get(i)?.as_deref()
    }

    fn required(&self, name: &'static str) -> Result<&str, XmlErrorKind> {
        self.raw(name).ok_or(XmlErrorKind::MissingAttribute {
            element: self.element,
            attribute: name,
        })
    }

    fn bad(&self, name: &'static str, why: String) -> XmlErrorKind {
        XmlErrorKind::BadValue {
            element: self.element,
            attribute: name,
            value: shorten(self.raw(name).unwrap_or(""), QUOTE_MAX),
            why,
        }
    }

    /// A required number: plain decimal digits that fit `T`.
    fn num<T: Number>(&self, name: &'static str) -> Result<T, XmlErrorKind> {
        let v = self.required(name)?;
        parse_num(v).ok_or_else(|| {
            self.bad(
                name,
                format!("not a decimal number from 0 to {}", T::MAX_TEXT),
            )
        })
    }

    /// An optional number (absent: `None`).
    fn opt_num<T: Number>(&self, name: &'static str) -> Result<Option<T>, XmlErrorKind> {
        match self.raw(name) {
            None => Ok(None),
            Some(_) => self.num(name).map(Some),
        }
    }
}

/// The unsigned integer types attributes hold.
trait Number: std::str::FromStr {
    const MAX_TEXT: &'static str;
}

impl Number for u32 {
    const MAX_TEXT: &'static str = "4294967295";
}

impl Number for u64 {
    const MAX_TEXT: &'static str = "18446744073709551615";
}

/// Plain decimal digits only (`FromStr` would also take a sign).
fn parse_num<T: Number>(v: &str) -> Option<T> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok()
}

fn superblock(e: &BytesStart<'_>) -> Result<Superblock, XmlErrorKind> {
    const NAMES: &[&str] = &[
        "uuid",
        "time",
        "transaction",
        "flags",
        "version",
        "data_block_size",
        "nr_data_blocks",
        "metadata_snap",
    ];
    let a = Attrs::read(e, "superblock", NAMES)?;
    // Required as thin_restore requires them, checked, then dropped.
    a.required("uuid")?;
    a.num::<u64>("time")?;
    a.opt_num::<u32>("flags")?;
    a.opt_num::<u64>("metadata_snap")?;
    if let Some(v) = a.opt_num::<u32>("version")? {
        if !(1..=METADATA_VERSION).contains(&v) {
            return Err(a.bad(
                "version",
                format!("dm-thin metadata versions are 1 and {METADATA_VERSION}"),
            ));
        }
    }
    let transaction_id = a.num::<u64>("transaction")?;
    let data_block_sectors = a.num::<u32>("data_block_size")?;
    if !data_block_sectors.is_power_of_two() || !(8..=2_097_152).contains(&data_block_sectors) {
        return Err(a.bad(
            "data_block_size",
            "a pool's data block size is a power of two from 8 to 2097152 sectors (4 KiB to 1 GiB)"
                .into(),
        ));
    }
    let nr_data_blocks = a.num::<u64>("nr_data_blocks")?;
    if nr_data_blocks > MAX_DATA_BLOCKS {
        return Err(a.bad(
            "nr_data_blocks",
            format!("a pool has at most {MAX_DATA_BLOCKS} data blocks"),
        ));
    }
    Ok(Superblock {
        data_block_sectors,
        nr_data_blocks,
        transaction_id,
    })
}

/// A `<device>`: its id and stated mapped block count.
fn device(e: &BytesStart<'_>) -> Result<(ThinId, u64), XmlErrorKind> {
    const NAMES: &[&str] = &[
        "dev_id",
        "mapped_blocks",
        "transaction",
        "creation_time",
        "snap_time",
    ];
    let a = Attrs::read(e, "device", NAMES)?;
    let id = a.num::<u32>("dev_id")?;
    let mapped = a.num::<u64>("mapped_blocks")?;
    a.num::<u64>("transaction")?;
    a.num::<u64>("creation_time")?;
    a.num::<u64>("snap_time")?;
    Ok((ThinId(id), mapped))
}

/// A `<range_mapping>` or `<single_mapping>`, checked against the pool's sizes.
fn mapping(
    e: &BytesStart<'_>,
    element: &'static str,
    sb: &Superblock,
) -> Result<DumpRun, XmlErrorKind> {
    let (names, v_name, d_name): (&'static [&'static str], _, _) = if element == "range_mapping" {
        (
            &["origin_begin", "data_begin", "length", "time"],
            "origin_begin",
            "data_begin",
        )
    } else {
        (
            &["origin_block", "data_block", "time"],
            "origin_block",
            "data_block",
        )
    };
    let a = Attrs::read(e, element, names)?;
    let v = a.num::<u64>(v_name)?;
    let d = a.num::<u64>(d_name)?;
    a.num::<u32>("time")?;
    let (len, len_name) = if element == "range_mapping" {
        (a.num::<u64>("length")?, "length")
    } else {
        (1, d_name)
    };
    if len == 0 {
        return Err(a.bad("length", "a mapping of no blocks".into()));
    }
    let nr = sb.nr_data_blocks;
    if d >= nr {
        return Err(a.bad(d_name, format!("beyond the pool's {nr} data blocks")));
    }
    if d.checked_add(len).is_none_or(|end| end > nr) {
        return Err(a.bad(
            len_name,
            format!("from data block {d}, runs past the pool's {nr} data blocks"),
        ));
    }
    let vmax = vblock_limit(sb.data_block_sectors);
    if v.checked_add(len).is_none_or(|end| end > vmax) {
        return Err(a.bad(
            if len == 1 { v_name } else { len_name },
            format!(
                "from virtual block {v}, runs past the largest virtual address ({vmax} blocks of {} sectors)",
                sb.data_block_sectors
            ),
        ));
    }
    Ok(DumpRun {
        vblock: VBlock(v),
        dblock: DataBlock(d),
        len,
    })
}

/// `s`, cut to `max` characters with `...` if longer.
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}
