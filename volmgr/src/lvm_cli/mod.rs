//! LVM's verbs on LVM2's own on-disk format, named as lvm2 names them and taking lvm2's flags
//! (`volmgr pvcreate`, `volmgr vgs -o +vg_uuid`, ...), so an administrator's habits and
//! scripts carry over. A VG written here is a VG lvm2 reads, and the other way round.

pub mod activate;
pub mod devices;
pub mod display;
pub mod lv;
pub mod lvconvert;
pub mod lvcreate;
pub mod lvremove;
pub mod lvrepair;
pub mod lvresize;
pub mod monitor;
pub mod pv;
pub mod pvchange;
pub mod pvmove;
pub mod report;
pub mod scan;
pub mod vg;

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

pub use devices::DeviceArgs;

/// The reporting options of `pvs`, `vgs` and `lvs` (lvm2's names).
#[derive(Args, Clone, Debug, Default)]
pub struct ReportArgs {
    /// Columns: `a,b` replaces the default list, `+a,b` adds, `-a` removes (`-o help` lists
    /// the fields).
    #[arg(
        short = 'o',
        long = "options",
        value_name = "FIELDS",
        allow_hyphen_values = true
    )]
    pub options: Vec<String>,
    /// Units for sizes: h (human, powers of 1024), H (powers of 1000), b, s (sectors),
    /// k m g t p e (1024), K M G T P E (1000).
    #[arg(long, value_name = "UNIT", default_value = "h")]
    pub units: String,
    /// No unit letter after sizes.
    #[arg(long)]
    pub nosuffix: bool,
    /// No heading line.
    #[arg(long)]
    pub noheadings: bool,
    /// Separate columns with this instead of padding them.
    #[arg(long, value_name = "SEP")]
    pub separator: Option<String>,
    /// `basic` (columns) or `json` (lvm2's JSON layout).
    #[arg(long, value_name = "FORMAT", default_value = "basic")]
    pub reportformat: String,
}

impl ReportArgs {
    /// The style these options ask for.
    pub fn style(&self) -> Result<report::Style> {
        let json = match self.reportformat.as_str() {
            "basic" => false,
            "json" => true,
            other => anyhow::bail!("--reportformat '{other}': use basic or json"),
        };
        Ok(report::Style {
            units: report::Units::parse(&self.units, self.nosuffix).map_err(anyhow::Error::msg)?,
            headings: !self.noheadings,
            separator: self.separator.clone(),
            json,
        })
    }

    /// Prints a report with `fields`, `default` columns and rows from `row`.
    pub fn print<T>(
        &self,
        object: &str,
        fields: &[report::Field],
        default: &[&str],
        items: &[T],
        row: impl Fn(&T, &str) -> report::Value,
    ) -> Result<()> {
        if self.options.iter().any(|o| o == "help") {
            for f in fields {
                println!("  {:<24} {}", f.name, f.heading);
            }
            return Ok(());
        }
        let cols = report::columns(fields, default, &self.options).map_err(anyhow::Error::msg)?;
        let rows: Vec<Vec<report::Value>> = items
            .iter()
            .map(|it| cols.iter().map(|c| row(it, c.name)).collect())
            .collect();
        let style = self.style()?;
        // lvm2 prints nothing at all, not even headings, for a report with no rows.
        if !rows.is_empty() || style.json {
            print!("{}", report::render(object, &cols, &rows, &style));
        }
        Ok(())
    }
}

/// Reports the names among `names` (VGs, or VG/LV) that name nothing the scan found, as lvm2
/// does ("Volume group ... not found", "Failed to find logical volume ..."), and fails (exit
/// status 5) if there is any.
pub fn refuse_unknown_names(names: &[String], scan: &scan::Scan) -> Result<()> {
    let mut unknown = Vec::new();
    for n in names {
        let s = n.strip_prefix("/dev/").unwrap_or(n);
        let (vg, lv) = match s.split_once('/') {
            Some((v, l)) => (v, Some(l)),
            None => (s, None),
        };
        match scan.report.vgs.iter().find(|v| v.name() == vg) {
            None => {
                eprintln!("  Volume group \"{vg}\" not found");
                eprintln!("  Cannot process volume group {vg}");
                unknown.push(n.as_str());
            }
            Some(v) if lv.is_some_and(|l| v.metadata.vg.lv(l).is_none()) => {
                eprintln!("  Failed to find logical volume \"{s}\"");
                unknown.push(n.as_str());
            }
            Some(_) => {}
        }
    }
    if unknown.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("not found: {}", unknown.join(", "))
    }
}

/// `--yes`, `--force` as lvm2 takes them.
#[derive(Args, Clone, Debug, Default)]
pub struct Confirm {
    /// Answer yes to every question (destructive operations ask otherwise and refuse when
    /// there is no terminal).
    #[arg(short = 'y', long)]
    pub yes: bool,
    /// Override checks (given twice, `-ff`, for the ones lvm2 wants twice).
    #[arg(short = 'f', long, action = clap::ArgAction::Count)]
    pub force: u8,
}

impl Confirm {
    /// Whether to go on with what `question` describes: yes with `--yes`; otherwise the
    /// answer typed on a terminal; without a terminal, an error that names `--yes`.
    pub fn ask(&self, question: &str) -> Result<bool> {
        use std::io::{BufRead, IsTerminal, Write};
        if self.yes {
            return Ok(true);
        }
        if !std::io::stdin().is_terminal() {
            anyhow::bail!("{question} Refusing without a terminal to ask on: add --yes");
        }
        eprint!("{question} [y/n]: ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        Ok(matches!(line.trim(), "y" | "Y" | "yes"))
    }
}

/// Whether a report or display verb given `names` (VGs or VG/LVs; none: everything) shows
/// LV `lv` of VG `vg`.
pub fn lv_wanted(names: &[String], vg: &str, lv: &str) -> bool {
    names.is_empty() || names.iter().any(|n| n == vg || *n == format!("{vg}/{lv}"))
}

/// Splits `VG/LV` (also `/dev/VG/LV`), naming the argument when it is not one.
pub fn split_lv_name(arg: &str) -> Result<(&str, &str)> {
    let s = arg.strip_prefix("/dev/").unwrap_or(arg);
    match s.split_once('/') {
        Some((vg, lv)) if !vg.is_empty() && !lv.is_empty() && !lv.contains('/') => Ok((vg, lv)),
        _ => anyhow::bail!("'{arg}': name the logical volume as VG/LV"),
    }
}

/// Parses a size with units as lvm2 takes it: a number with an optional unit letter
/// (b s k m g t p e, either case, powers of 1024; no letter means `default`), e.g. `4m`,
/// `1.5G`, `8192s`.
pub fn parse_lvm_size(s: &str, default: char) -> Result<tables::Bytes> {
    let s = s.trim();
    let (num, unit) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => (&s[..s.len() - 1], c.to_ascii_lowercase()),
        _ => (s, default),
    };
    let mul: u64 = match unit {
        'b' => 1,
        's' => 512,
        'k' => 1 << 10,
        'm' => 1 << 20,
        'g' => 1 << 30,
        't' => 1 << 40,
        'p' => 1 << 50,
        'e' => 1 << 60,
        _ => anyhow::bail!("size '{s}': unknown unit '{unit}' (b s k m g t p e)"),
    };
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("size '{s}' is not a number with an optional unit"))?;
    if !v.is_finite() || v < 0.0 {
        anyhow::bail!("size '{s}' is not a positive number");
    }
    let bytes = v * mul as f64;
    if bytes > u64::MAX as f64 {
        anyhow::bail!("size '{s}' is too large");
    }
    Ok(tables::Bytes(bytes.round() as u64))
}

/// Absolute form of device paths given on the command line (scans name devices by path);
/// network extents (`nbd://...`, `iscsi://...`) stay as they are.
pub fn absolute(paths: &[PathBuf]) -> Vec<PathBuf> {
    paths.iter().map(|p| absolute_one(p)).collect()
}

/// [`absolute`] of one device.
pub fn absolute_one(p: &std::path::Path) -> PathBuf {
    if is_group(p) {
        // Each path of a group on its own (`a.img|nbd://h/d` -> `/cwd/a.img|nbd://h/d`).
        let name = p.to_string_lossy();
        let parts: Vec<String> = lvm::paths::group_paths(&name)
            .into_iter()
            .map(|q| absolute_one(std::path::Path::new(q)).display().to_string())
            .collect();
        return PathBuf::from(parts.join(&lvm::paths::PATH_SEPARATOR.to_string()));
    }
    if is_network(p) {
        return p.to_path_buf();
    }
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Whether a device name is a group of paths to one PV (`PATH1|PATH2`, [`lvm::paths`]).
pub fn is_group(p: &std::path::Path) -> bool {
    lvm::paths::is_group(&p.to_string_lossy())
}

/// Whether a device name is a network extent's URI (a PV on another storage host).
pub fn is_network(p: &std::path::Path) -> bool {
    extents::net::NetUri::is_network(&p.to_string_lossy())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_lvm2_writes_them() {
        assert_eq!(parse_lvm_size("4m", 'm').unwrap().0, 4 << 20);
        assert_eq!(parse_lvm_size("4", 'm').unwrap().0, 4 << 20);
        assert_eq!(parse_lvm_size("1.5G", 'm').unwrap().0, 3 << 29);
        assert_eq!(parse_lvm_size("8192s", 'm').unwrap().0, 4 << 20);
        assert!(parse_lvm_size("4x", 'm').is_err());
        assert!(parse_lvm_size("-1m", 'm').is_err());
        assert!(parse_lvm_size("m", 'm').is_err());
    }
}
