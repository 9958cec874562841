//! `volmgr table`: validate table files.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Subcommand;
use tables::table::Table;

#[derive(Subcommand)]
pub enum TableCmd {
    /// Validate a table and print it normalized; exit 1 with the error otherwise.
    Check {
        /// Table file ('-' for standard input).
        file: PathBuf,
        /// Print the table as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn read_table_text(file: &Path) -> Result<String> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the table from standard input")?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading table {}", file.display()))
    }
}

/// Parses and validates a table file: its lines, and the syntax of every network extent it
/// names (no connection is made).
pub fn parse_table(file: &Path) -> Result<Table> {
    let text = read_table_text(file)?;
    let reg = volmgr::registry();
    let t = Table::parse(&text, &reg).with_context(|| file.display().to_string())?;
    for d in t.devices(&reg) {
        if extents::net::NetUri::is_network(&d.name) {
            extents::net::NetUri::parse(&d.name).with_context(|| {
                format!(
                    "{}: line {}, argument {}",
                    file.display(),
                    d.line,
                    d.arg + 1
                )
            })?;
        }
    }
    Ok(t)
}

/// The table of `file` as the daemon should get it: validated here (errors name the file),
/// relative paths made absolute against our working directory, normalized.
pub fn table_for_daemon(file: &Path) -> Result<String> {
    let reg = volmgr::registry();
    let mut t = parse_table(file)?;
    let cwd = std::env::current_dir().context("finding the working directory")?;
    volmgr::absolute_paths(&mut t, &reg, &cwd);
    Ok(t.to_string())
}

pub fn table_check(file: &Path, json: bool) -> Result<()> {
    let t = parse_table(file)?;
    if json {
        let segs: Vec<serde_json::Value> = t
            .segments
            .iter()
            .map(|s| {
                serde_json::json!({
                    "start": s.start.0, "length": s.len.0, "target": s.target, "args": s.args
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "size_sectors": t.size().0,
                "segments": segs,
            }))?
        );
    } else {
        print!("{t}");
    }
    Ok(())
}

/// Runs a `table` verb.
pub fn run(cmd: TableCmd) -> Result<()> {
    match cmd {
        TableCmd::Check { file, json } => table_check(&file, json),
    }
}
