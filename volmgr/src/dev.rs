//! `volmgr dev`: the daemon's devices (dmsetup-like verbs).

use std::path::PathBuf;

use anyhow::Result;
use clap::Subcommand;
use ublk_target::control::{DeviceInfo, Reply, Request};

use crate::client::{call, expect_text, StateDir};
use crate::nbd_opts::NbdLimitArgs;
use crate::table_cmd::table_for_daemon;

#[derive(Subcommand)]
pub enum DevCmd {
    /// Create a device from a table; prints /dev/ublkbN (or the NBD URI).
    Create {
        /// Device name.
        name: String,
        /// Table file ('-' for standard input).
        #[arg(long)]
        table: PathBuf,
        /// ublk device id to use.
        #[arg(long)]
        ublk_id: Option<u32>,
        /// Export over NBD at HOST:PORT instead of ublk.
        #[arg(long)]
        nbd: Option<String>,
        /// This export's NBD limits (over the daemon's).
        #[command(flatten)]
        limits: NbdLimitArgs,
        /// No front end: the device only serves the daemon's other devices, whose tables
        /// name it as /dev/volmgr/NAME.
        #[arg(long, conflicts_with_all = ["nbd", "ublk_id"])]
        internal: bool,
        #[command(flatten)]
        sd: StateDir,
    },
    /// List devices (name, path, size, targets, state, I/O counters).
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Print a device's table.
    Table {
        /// Device name.
        name: String,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Load a new table and swap it in (suspend, swap, resume). The size may grow.
    Reload {
        /// Device name.
        name: String,
        /// New table file.
        #[arg(long)]
        table: PathBuf,
        /// Do not flush the old table before the swap (dmsetup's --noflush): for a table
        /// whose storage is gone.
        #[arg(long)]
        noflush: bool,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Flush and remove a device (refused while open or mounted unless --force).
    Remove {
        /// Device name.
        name: String,
        /// Remove even if it is open or mounted.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Build a failed device again from its recorded table (after fixing what made it fail:
    /// a missing backing file, a port in use...).
    Retry {
        /// Device name.
        name: String,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Wait until the device's background work (raid resync, rebuild, check) is done,
    /// with a progress bar on a terminal (a line every 5 s otherwise).
    Wait {
        /// Device name.
        name: String,
        /// Give up (exit 1) after this many seconds.
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Stop admitting I/O, drain in-flight requests, flush.
    Suspend {
        /// Device name.
        name: String,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Admit I/O again.
    Resume {
        /// Device name.
        name: String,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Send a message to the device's target (as dmsetup message).
    Message {
        /// Device name.
        name: String,
        /// Message words.
        #[arg(trailing_var_arg = true, required = true)]
        args: Vec<String>,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Print the device's status line(s).
    Status {
        /// Device name.
        name: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sd: StateDir,
    },
}

fn print_devices(devs: &[DeviceInfo], json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(&devs)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<28} {:>10} {:<10} {:<20} {:>10} {:>10} {:>6} Data",
        "Name", "Device", "Size", "State", "Targets", "Read", "Written", "Errors"
    );
    for d in devs {
        println!(
            "{:<16} {:<28} {:>10} {:<10} {:<20} {:>10} {:>10} {:>6} {}",
            d.name,
            d.path,
            tables::units::human(tables::Bytes(d.size)),
            d.state,
            d.targets,
            tables::units::human(tables::Bytes(d.read_bytes)),
            tables::units::human(tables::Bytes(d.write_bytes)),
            d.errors,
            d.data_path
        );
        if let Some(e) = &d.error {
            println!("{:<16} error: {e}", "");
        }
    }
    Ok(())
}

/// Runs a `dev` verb.
pub fn run(cmd: DevCmd) -> Result<()> {
    match cmd {
        DevCmd::Create {
            name,
            table,
            ublk_id,
            nbd,
            limits,
            internal,
            sd,
        } => {
            let text = table_for_daemon(&table)?;
            let nbd_limits = limits.overrides()?;
            if nbd.is_none() && !nbd_limits.is_empty() {
                anyhow::bail!("--nbd-* limits apply to NBD exports: give --nbd ADDR too");
            }
            let r = call(
                &sd,
                Request::Create {
                    name,
                    table: text,
                    ublk_id,
                    nbd,
                    nbd_limits,
                    internal,
                    export: None,
                },
            )?;
            println!("{}", expect_text(r)?);
        }
        DevCmd::List { json, sd } => match call(&sd, Request::List)? {
            Reply::Devices { devices } => print_devices(&devices, json)?,
            other => {
                expect_text(other)?;
            }
        },
        DevCmd::Table { name, sd } => {
            print!("{}", expect_text(call(&sd, Request::Table { name })?)?)
        }
        DevCmd::Reload {
            name,
            table,
            noflush,
            sd,
        } => {
            let text = table_for_daemon(&table)?;
            let req = if noflush {
                Request::ReloadNoFlush { name, table: text }
            } else {
                Request::Reload { name, table: text }
            };
            println!("{}", expect_text(call(&sd, req)?)?);
        }
        DevCmd::Remove { name, force, sd } => {
            println!(
                "{}",
                expect_text(call(&sd, Request::Remove { name, force })?)?
            )
        }
        DevCmd::Wait { name, timeout, sd } => {
            let work = crate::progress::follow(
                &name,
                timeout.map(std::time::Duration::from_secs),
                || {
                    let st = expect_text(call(&sd, Request::Status { name: name.clone() })?)?;
                    Ok(crate::progress::parse_work(&st))
                },
            )?;
            if work.is_empty() {
                println!("{name}: no background work to wait for");
            } else {
                println!("{}", expect_text(call(&sd, Request::Status { name })?)?);
            }
        }
        DevCmd::Retry { name, sd } => {
            println!("{}", expect_text(call(&sd, Request::Retry { name })?)?)
        }
        DevCmd::Suspend { name, sd } => {
            println!("{}", expect_text(call(&sd, Request::Suspend { name })?)?)
        }
        DevCmd::Resume { name, sd } => {
            println!("{}", expect_text(call(&sd, Request::Resume { name })?)?)
        }
        DevCmd::Message { name, args, sd } => {
            let t = expect_text(call(&sd, Request::Message { name, args })?)?;
            if !t.is_empty() {
                println!("{t}");
            }
        }
        DevCmd::Status { name, json, sd } => {
            let t = expect_text(call(&sd, Request::Status { name: name.clone() })?)?;
            if json {
                let lines: Vec<&str> = t.lines().collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &serde_json::json!({"name": name, "status": lines})
                    )?
                );
            } else {
                println!("{t}");
            }
        }
    }
    Ok(())
}
