//! Size arguments (`-L`, `-l`, `-I`) and their conversion to extents, with lvm2 2.03's
//! rounding and messages (`tools/lvmcmdline.c` `_size_arg`/`_extents_arg`, `tools/lvcreate.c`
//! `_update_extents_params`, `lib/metadata/lv_manip.c` `_round_to_stripe_boundary` and
//! `_lvresize_*`, `tools/toollib.c` `_validate_stripe_params`).

use tables::Sectors;

use super::{space, AllocError, PvSelection};
use crate::model::{SegmentKind, VolumeGroup};
use crate::units::Extents;

/// lvm2's default stripe size (`metadata/stripesize`, 64 KiB).
pub const DEFAULT_STRIPE_SIZE: Sectors = Sectors(128);
/// Most stripes lvm2 allows.
pub const MAX_STRIPES: u32 = 128;
/// Smallest stripe size: a page (4 KiB) in sectors.
const STRIPE_SIZE_MIN: u64 = 8;
/// lvm2's `STRIPE_SIZE_LIMIT`; stripe sizes above twice this (in sectors) are refused.
const STRIPE_SIZE_LIMIT: u64 = (u32::MAX as u64 >> 2) + 1;

/// A leading `+` or `-`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Sign {
    /// No sign: an absolute size.
    None,
    /// `+`: grow by.
    Plus,
    /// `-`: shrink by.
    Minus,
}

/// What a percentage is of (`-l 50%FREE`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum PercentOf {
    /// `%VG` (`V`): all extents of the VG.
    Vg,
    /// `%FREE` (`F`, `FR`): the VG's free extents.
    Free,
    /// `%PVS` (`P`, `PV`): the free extents of the PVs given (without a PV list: all extents
    /// of the VG, as lvm2 counts).
    Pvs,
    /// `%LV` (`L`): the LV's extents (lvextend only).
    Lv,
    /// `%ORIGIN` (`O`, `OR`): a snapshot origin's extents (not supported here).
    Origin,
}

impl std::fmt::Display for PercentOf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PercentOf::Vg => "VG",
            PercentOf::Free => "FREE",
            PercentOf::Pvs => "PVS",
            PercentOf::Lv => "LV",
            PercentOf::Origin => "ORIGIN",
        })
    }
}

/// How much, before it is turned into extents.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Amount {
    /// `-L`: a size in sectors (truncated, as lvm2 does).
    Sectors(Sectors),
    /// `-l N`.
    Extents(Extents),
    /// `-l N%WHAT`.
    Percent {
        /// The percentage (may exceed 100).
        percent: u32,
        /// Of what.
        of: PercentOf,
    },
}

/// A parsed `-L` or `-l` argument.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Size {
    /// Leading sign.
    pub sign: Sign,
    /// The amount.
    pub amount: Amount,
}

fn invalid(msg: impl Into<String>) -> AllocError {
    AllocError::Invalid(msg.into())
}

/// Parses `-L` (`is_extents` false) or `-l` (`is_extents` true) as lvm2 does.
///
/// `-L`: a decimal number, optionally fractional (`1.5g`), then a unit of which only the
/// first letter counts, in either case: `k m g t p e` (powers of 1024), `s` (sectors), `b`
/// (bytes, a multiple of 512); no unit is MiB. The size is truncated to whole sectors.
/// Hexadecimal numbers, which lvm2's `strtod` would also take, are refused.
///
/// `-l`: an integer, optionally followed by `%VG`, `%FREE`, `%PVS`, `%LV` or `%ORIGIN`
/// (or their abbreviations, any case).
///
/// Both take a leading `+` or `-`; [`Size::to_extents`] refuses them (lvcreate), and
/// [`Size::to_extend_extents`] takes `+` (lvextend).
pub fn parse_size(arg: &str, is_extents: bool) -> Result<Size, AllocError> {
    let (sign, rest) = match arg.as_bytes().first() {
        Some(b'+') => (Sign::Plus, &arg[1..]),
        Some(b'-') => (Sign::Minus, &arg[1..]),
        _ => (Sign::None, arg),
    };
    if is_extents {
        parse_extents(arg, sign, rest)
    } else {
        parse_sectors(sign, rest)
    }
}

fn parse_extents(arg: &str, sign: Sign, rest: &str) -> Result<Size, AllocError> {
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err(invalid(format!("Invalid argument for --extents: {arg}")));
    }
    let n: u64 = rest[..digits]
        .parse()
        .map_err(|_| invalid(format!("Invalid argument for --extents: {arg}")))?;
    // lvm2 clamps to UINT32_MAX.
    let n32 = u32::try_from(n).unwrap_or(u32::MAX);
    let tail = &rest[digits..];
    if tail.is_empty() {
        return Ok(Size {
            sign,
            amount: Amount::Extents(Extents(n32)),
        });
    }
    let Some(what) = tail.strip_prefix('%') else {
        return Err(invalid(format!("Invalid argument for --extents: {arg}")));
    };
    let of = match what.to_ascii_uppercase().as_str() {
        "V" | "VG" => PercentOf::Vg,
        "L" | "LV" => PercentOf::Lv,
        "P" | "PV" | "PVS" => PercentOf::Pvs,
        "F" | "FR" | "FREE" => PercentOf::Free,
        "O" | "OR" | "ORIGIN" => PercentOf::Origin,
        _ => return Err(invalid(format!("Specified %{what} is unknown."))),
    };
    if n >= u64::from(u32::MAX) {
        return Err(invalid(format!("Percentage is too big (>={}%).", u32::MAX)));
    }
    Ok(Size {
        sign,
        amount: Amount::Percent { percent: n32, of },
    })
}

fn parse_sectors(sign: Sign, rest: &str) -> Result<Size, AllocError> {
    if rest.starts_with(['+', '-']) {
        return Err(invalid("Multiple sign symbols detected."));
    }
    let b = rest.as_bytes();
    if !b.first().is_some_and(|c| c.is_ascii_digit() || *c == b'.') {
        return Err(invalid("Size requires number argument."));
    }
    // The longest prefix `strtod` reads as a decimal number: digits, a fraction, an
    // exponent only when digits follow it (else `1e` is one exabyte).
    let mut i = b.iter().take_while(|c| c.is_ascii_digit()).count();
    if b.get(i) == Some(&b'.') {
        i += 1;
        i += b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        let mut j = i + 1;
        if matches!(b.get(j), Some(b'+' | b'-')) {
            j += 1;
        }
        let exp = b[j.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if exp > 0 {
            i = j + exp;
        }
    }
    let mut v: f64 = rest[..i]
        .parse()
        .map_err(|_| invalid(format!("Can't parse size argument at '{}'.", &rest[..1])))?;
    match rest[i..].chars().next().map(|c| c.to_ascii_lowercase()) {
        None => v *= 2048.0,
        Some('s') => {}
        Some('b') => {
            // Truncated to whole bytes, as lvm2's cast does.
            let bytes = v as u64;
            let adjust = bytes % 512;
            if adjust != 0 {
                let up = bytes + (512 - adjust);
                return Err(invalid(format!(
                    "Size is not a multiple of 512. Try using {} or {up}.",
                    up - 512
                )));
            }
            v /= 512.0;
        }
        Some(c) => {
            let Some(power) = "kmgtpe".find(c) else {
                return Err(invalid("Can't parse size argument."));
            };
            for _ in 0..power {
                v *= 1024.0;
            }
            v *= 2.0;
        }
    }
    if !v.is_finite() || v >= (u64::MAX >> 9) as f64 {
        return Err(invalid("Size is too big (>=16EiB)."));
    }
    Ok(Size {
        sign,
        amount: Amount::Sectors(Sectors(v as u64)),
    })
}

/// A size as lvm2 prints it in messages (its default `--units r`): two decimals in the
/// largest binary unit not above it, `<` when that rounds up, bytes without decimals.
pub fn display_size(sectors: u64) -> String {
    if sectors == 0 {
        return "0 ".to_string();
    }
    let bytes = u128::from(sectors) * 512;
    const UNITS: [&str; 6] = ["EiB", "PiB", "TiB", "GiB", "MiB", "KiB"];
    let mut unit: u128 = 1 << 60;
    for name in UNITS {
        if bytes >= unit {
            let d = bytes as f64 / unit as f64;
            let hundredths = 100.0 * d;
            let prefix = if (hundredths.floor() - hundredths.round()).abs() > 0.00001 {
                "<"
            } else {
                ""
            };
            return format!("{prefix}{d:.2} {name}");
        }
        unit >>= 10;
    }
    format!("{bytes} B")
}

/// Messages collected while converting, printed by lvm2 one per line.
#[derive(Default)]
struct Notes(Vec<String>);

impl Notes {
    fn push(&mut self, s: String) {
        self.0.push(s);
    }
    fn into_option(self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join("\n"))
    }
}

/// VG-wide counts a size refers to.
struct Counts {
    extent_size: u64,
    /// All extents of the VG.
    total: u64,
    /// Free extents of the VG (every PV, as lvm2's `free_count`).
    free: u64,
}

fn counts(vg: &VolumeGroup) -> Counts {
    Counts {
        extent_size: vg.extent_size.0.max(1),
        total: vg
            .physical_volumes
            .iter()
            .map(|p| u64::from(p.pe_count.0))
            .sum(),
        free: super::free_report(vg)
            .iter()
            .map(|p| u64::from(p.free.0))
            .sum(),
    }
}

/// Free extents of the selected PVs (usable ones, in their ranges), for `%PVS`.
fn selection_free(vg: &VolumeGroup, pvs: &PvSelection) -> Result<u64, AllocError> {
    Ok(space::eligible(vg, Some(pvs))?.total())
}

/// lvm2's `percent_of_extents`, saturated to 32 bits.
fn percent_of(percent: u32, count: u64, roundup: bool) -> u64 {
    let n = (u128::from(percent) * u128::from(count) + if roundup { 99 } else { 0 }) / 100;
    u64::try_from(n)
        .unwrap_or(u64::MAX)
        .min(u64::from(u32::MAX))
}

fn to_u32(n: u64, c: &Counts) -> Result<u32, AllocError> {
    u32::try_from(n).map_err(|_| {
        invalid(format!(
            "Volume too large ({}) for extent size {}. Upper limit is less than {}.",
            display_size(n.saturating_mul(c.extent_size)),
            display_size(c.extent_size),
            display_size(u64::from(u32::MAX).saturating_mul(c.extent_size))
        ))
    })
}

impl Size {
    /// Whether lvm2 allocates this size "approximately": a percentage, of which it takes
    /// as much as fits when the whole does not (set [`super::Request::approx`]).
    pub fn is_approximate(&self) -> bool {
        matches!(self.amount, Amount::Percent { .. })
    }

    fn what(&self) -> &'static str {
        match self.amount {
            Amount::Sectors(_) => "--size",
            _ => "--extents",
        }
    }

    /// Extents of a new LV of `stripes` stripes (lvcreate), and lvm2's messages about the
    /// rounding (`Rounding up size to full physical extent 8.00 MiB`, stripe boundary), one
    /// per line. `pvs` is the PV list of the command line (for `%PVS`).
    pub fn to_extents(
        &self,
        vg: &VolumeGroup,
        pvs: Option<&PvSelection>,
        stripes: u32,
    ) -> Result<(Extents, Option<String>), AllocError> {
        self.to_image_extents(vg, pvs, stripes, 1)
    }

    /// As [`Size::to_extents`], for a raid LV of `legs` images: a percentage of PV space is
    /// shared among the images (lvm2 divides it by the image count).
    pub fn to_image_extents(
        &self,
        vg: &VolumeGroup,
        pvs: Option<&PvSelection>,
        stripes: u32,
        legs: u32,
    ) -> Result<(Extents, Option<String>), AllocError> {
        if self.sign != Sign::None {
            return Err(invalid(match self.amount {
                Amount::Sectors(_) => "Size may not be relative/signed.",
                _ => "Extents may not be relative/signed.",
            }));
        }
        let c = counts(vg);
        let mut notes = Notes::default();
        let stripes = u64::from(stripes.max(1));
        let mut extents = match self.amount {
            Amount::Sectors(Sectors(0))
            | Amount::Extents(Extents(0))
            | Amount::Percent { percent: 0, .. } => {
                return Err(invalid(format!("{} may not be zero.", self.what())))
            }
            Amount::Sectors(Sectors(s)) => {
                let mut size = s;
                if size % c.extent_size != 0 {
                    size = size.saturating_add(c.extent_size - size % c.extent_size);
                    notes.push(format!(
                        "Rounding up size to full physical extent {}",
                        display_size(size)
                    ));
                }
                u64::from(to_u32(size / c.extent_size, &c)?)
            }
            Amount::Extents(Extents(n)) => u64::from(n),
            Amount::Percent { percent, of } => {
                let mut e = match of {
                    PercentOf::Vg => {
                        let e = percent_of(percent, c.total, false);
                        if e > c.free {
                            notes.push(format!(
                                "Reducing {percent}%VG to remaining free space {} in VG.",
                                display_size(c.free.saturating_mul(c.extent_size))
                            ));
                            c.free
                        } else {
                            e
                        }
                    }
                    PercentOf::Free => percent_of(percent, c.free, false),
                    PercentOf::Pvs => match pvs {
                        Some(sel) => percent_of(percent, selection_free(vg, sel)?, false),
                        None => percent_of(percent, c.total, false),
                    },
                    PercentOf::Lv | PercentOf::Origin => {
                        return Err(invalid("Please express size as %FREE, %PVS or %VG."))
                    }
                };
                if e == 0 {
                    return Err(invalid(
                        "Calculated size of logical volume is 0 extents. Needs to be larger.",
                    ));
                }
                if legs > 1 {
                    e = (e / u64::from(legs)).max(1);
                }
                let rest = e % stripes;
                if rest != 0 && c.free < e - rest + stripes {
                    notes.push(format!(
                        "Rounding size ({e} extents) down to stripe boundary size ({} extents)",
                        e - rest
                    ));
                    e -= rest;
                }
                if e == 0 {
                    return Err(invalid(
                        "Adjusted size of logical volume is 0 extents. Needs to be larger.",
                    ));
                }
                e
            }
        };
        let rest = extents % stripes;
        if rest != 0 {
            let up = extents + stripes - rest;
            notes.push(format!(
                "Rounding size {} ({extents} extents) up to stripe boundary size {} ({up} extents).",
                display_size(extents.saturating_mul(c.extent_size)),
                display_size(up.saturating_mul(c.extent_size))
            ));
            extents = up;
        }
        Ok((Extents(to_u32(extents, &c)?), notes.into_option()))
    }

    /// How many extents `lvextend` with this size adds to LV `lv` (a `+` size adds, an
    /// unsigned one is the new size), with lvm2's rounding (`-L` up to whole extents,
    /// percentages up, the added part up to whole stripes of the LV's last segment) and its
    /// messages. `pvs` is the PV list of the command line (for `%PVS`).
    pub fn to_extend_extents(
        &self,
        vg: &VolumeGroup,
        lv: &str,
        pvs: Option<&PvSelection>,
    ) -> Result<(Extents, Option<String>), AllocError> {
        let l = vg.lv(lv).ok_or_else(|| AllocError::UnknownLv {
            lv: lv.to_string(),
            vg: vg.name.clone(),
        })?;
        if self.sign == Sign::Minus {
            return Err(invalid(
                "Negative argument not permitted - use lvreduce or lvresize to shrink.",
            ));
        }
        let c = counts(vg);
        let cur = u64::from(l.extent_count().map_or(0, |e| e.0));
        // A raid LV grows by whole rows of its data images, as a striped one by stripes.
        let stripes = match (
            l.segments.last().map(|s| &s.kind),
            super::raid_segment(vg, lv),
        ) {
            (Some(SegmentKind::Striped { stripes, .. }), _) => stripes.len().max(1) as u64,
            (_, Some(r)) => u64::from(
                r.level
                    .data_images(u32::try_from(r.images.len()).unwrap_or(u32::MAX))
                    .unwrap_or(1)
                    .max(1),
            ),
            _ => 1,
        };
        let mut notes = Notes::default();
        let n = match self.amount {
            Amount::Sectors(Sectors(s)) => {
                let mut size = s;
                let adjust = size % c.extent_size;
                if adjust != 0 {
                    size = size.saturating_add(c.extent_size - adjust);
                    notes.push(format!(
                        "Rounding size to boundary between physical extents: {}.",
                        display_size(size)
                    ));
                }
                size / c.extent_size
            }
            Amount::Extents(Extents(n)) => u64::from(n),
            Amount::Percent { percent, of } => match of {
                PercentOf::Vg => {
                    let e = percent_of(percent, c.total, true);
                    if self.sign == Sign::None && e > cur + c.free {
                        notes.push(format!(
                            "Reducing {percent}%VG to remaining free space {} in VG.",
                            display_size((cur + c.free).saturating_mul(c.extent_size))
                        ));
                        cur + c.free
                    } else {
                        e
                    }
                }
                PercentOf::Free => percent_of(percent, c.free, true),
                PercentOf::Lv => percent_of(percent, cur, true),
                PercentOf::Pvs => match pvs {
                    Some(sel) => percent_of(percent, selection_free(vg, sel)?, true),
                    None => percent_of(percent, c.total, true),
                },
                PercentOf::Origin => {
                    return Err(invalid("Specified LV does not have an origin LV."))
                }
            },
        };
        let mut new = match self.sign {
            Sign::Plus => cur.saturating_add(n),
            _ => n,
        };
        if new == 0 {
            return Err(invalid("New size of 0 not permitted."));
        }
        if stripes > 1 && new > cur {
            let rest = (new - cur) % stripes;
            let percent = matches!(self.amount, Amount::Percent { .. });
            if rest != 0 && (!percent || c.free >= new - cur - rest + stripes) {
                let up = new - rest + stripes;
                notes.push(format!(
                    "Rounding size ({new} extents) up to stripe boundary size for segment ({up} extents)."
                ));
                new = up;
            } else if rest != 0 {
                notes.push(format!(
                    "Rounding size ({new} extents) down to stripe boundary size for segment ({} extents)",
                    new - rest
                ));
                new -= rest;
            }
        }
        if new < cur {
            return Err(invalid(format!(
                "New size given ({new} extents) not larger than existing size ({cur} extents)"
            )));
        }
        if new == cur {
            return Err(invalid(format!(
                "New size ({new} extents) matches existing size ({cur} extents)."
            )));
        }
        to_u32(new, &c)?;
        Ok((Extents(to_u32(new - cur, &c)?), notes.into_option()))
    }
}

/// The stripe size for `stripes` stripes in `vg` (`-I`; `None`: not given), with lvm2's
/// checks and messages: ignored for one stripe, 64 KiB by default, a power of two of at
/// least 4 KiB, reduced to the extent size when larger.
pub fn stripe_size(
    vg: &VolumeGroup,
    stripes: u32,
    requested: Option<Sectors>,
) -> Result<(Option<Sectors>, Option<String>), AllocError> {
    if stripes == 0 || stripes > MAX_STRIPES {
        return Err(invalid(format!(
            "Number of stripes ({stripes}) must be between 1 and {MAX_STRIPES}."
        )));
    }
    if requested == Some(Sectors(0)) {
        return Err(invalid("--stripesize may not be zero."));
    }
    let mut notes = Notes::default();
    if stripes == 1 {
        if requested.is_some() {
            notes.push("Ignoring stripesize argument with single stripe.".into());
        }
        return Ok((None, notes.into_option()));
    }
    let size = match requested {
        Some(s) => s.0,
        None => {
            notes.push(format!(
                "Using default stripesize {}.",
                display_size(DEFAULT_STRIPE_SIZE.0)
            ));
            DEFAULT_STRIPE_SIZE.0
        }
    };
    if size > STRIPE_SIZE_LIMIT * 2 {
        return Err(invalid(format!(
            "Stripe size cannot be larger than {}.",
            display_size(STRIPE_SIZE_LIMIT)
        )));
    }
    if size < STRIPE_SIZE_MIN || !size.is_power_of_two() {
        return Err(invalid(format!(
            "Invalid stripe size {}.",
            display_size(size)
        )));
    }
    let mut size = size;
    if size > vg.extent_size.0 {
        notes.push(format!(
            "Reducing requested stripe size {} to maximum, physical extent size {}.",
            display_size(size),
            display_size(vg.extent_size.0)
        ));
        size = vg.extent_size.0;
    }
    Ok((Some(Sectors(size)), notes.into_option()))
}
