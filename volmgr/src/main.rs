//! `volmgr`: compose volumes from device-mapper tables and serve them as block devices.

mod client;
mod daemon_cmd;
mod dev;
mod docs_cmd;
mod lvm_cli;
mod nbd_opts;
mod pool;
mod progress;
mod serve;
mod systemd;
mod table_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "volmgr",
    version,
    about = "Compose volumes from device-mapper tables and serve them as /dev/ublkbN or over NBD"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Work with table files.
    #[command(subcommand)]
    Table(table_cmd::TableCmd),
    /// Serve one table in the foreground until SIGINT/SIGTERM (then flush and exit 0).
    Serve(serve::ServeArgs),
    /// Run the volume daemon (control socket, named devices, crash recovery).
    Daemon(daemon_cmd::DaemonArgs),
    /// Manage the daemon's devices (dmsetup-like).
    #[command(subcommand)]
    Dev(dev::DevCmd),
    /// Thin-pool metadata tools (the pool must not be in use).
    #[command(subcommand)]
    Pool(pool::PoolCmd),
    /// Print a shell completion script (`volmgr completions bash > /etc/bash_completion.d/volmgr`).
    Completions(docs_cmd::CompletionsArgs),
    /// Write the manual pages (volmgr.8 and one per subcommand) into a directory.
    Manpages(docs_cmd::ManpagesArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Table(c) => table_cmd::run(c),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Daemon(a) => daemon_cmd::run(a),
        Cmd::Dev(c) => dev::run(c),
        Cmd::Pool(c) => pool::run(c),
        Cmd::Completions(a) => docs_cmd::completions(a),
        Cmd::Manpages(a) => docs_cmd::manpages(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volmgr: {e:#}");
            ExitCode::FAILURE
        }
    }
}
