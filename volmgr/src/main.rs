//! `volmgr`: compose volumes from device-mapper tables and serve them as block devices.

mod client;
mod daemon_cmd;
mod dev;
mod docs_cmd;
mod lvm_cli;
mod nbd_opts;
mod pool;
mod pool_dedup;
mod pool_import;
mod progress;
mod repl;
mod serve;
mod systemd;
mod table_cmd;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "volmgr",
    version,
    about = "Compose volumes from device-mapper tables, or manage them with LVM's verbs on LVM2's format, and serve them as /dev/ublkbN or over NBD"
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
    /// Asynchronous replication of thin volumes to another daemon: primary, secondary,
    /// status, promote, demote.
    #[command(subcommand)]
    Repl(repl::ReplCmd),
    /// Initialize devices or files as LVM physical volumes (lvm2's format).
    Pvcreate(lvm_cli::pv::PvcreateArgs),
    /// Remove the PV label from devices that are in no VG.
    Pvremove(lvm_cli::pv::PvremoveArgs),
    /// Report physical volumes (lvm2's columns, units and JSON).
    Pvs(lvm_cli::pv::PvsArgs),
    /// Resize PVs to their device's size or a given size.
    Pvresize(lvm_cli::pv::PvresizeArgs),
    /// Create a volume group from PVs.
    Vgcreate(lvm_cli::vg::VgcreateArgs),
    /// Add PVs to a volume group.
    Vgextend(lvm_cli::vg::VgextendArgs),
    /// Remove unused PVs from a volume group (or the missing ones: --removemissing).
    Vgreduce(lvm_cli::vg::VgreduceArgs),
    /// Rename a volume group (named by name or uuid).
    Vgrename(lvm_cli::vg::VgrenameArgs),
    /// Restore a volume group's metadata from a backup file.
    Vgcfgrestore(lvm_cli::vg::VgcfgrestoreArgs),
    /// Remove volume groups (their PVs stay PVs).
    Vgremove(lvm_cli::vg::VgremoveArgs),
    /// Report volume groups.
    Vgs(lvm_cli::vg::VgsArgs),
    /// Check every copy of the VG metadata.
    Vgck(lvm_cli::vg::VgckArgs),
    /// Write a VG's metadata to a file in lvm2's backup format.
    Vgcfgbackup(lvm_cli::vg::VgcfgbackupArgs),
    /// Report logical volumes.
    Lvs(lvm_cli::lv::LvsArgs),
    /// Create an LV: linear, striped, raid1/5/10, thin pool, thin, thin snapshot (activated
    /// through the daemon when one runs).
    Lvcreate(Box<lvm_cli::lvcreate::LvcreateArgs>),
    /// Grow an LV (and with -r its file system), online.
    Lvextend(lvm_cli::lvresize::LvresizeArgs),
    /// Resize an LV: grow as lvextend, shrink as lvreduce.
    Lvresize(lvm_cli::lvresize::LvresizeArgs),
    /// Shrink a linear or striped LV (with -r its ext4 first).
    Lvreduce(lvm_cli::lvresize::LvresizeArgs),
    /// Convert a linear/striped LV to raid1 (`-m 1`) and back (`-m 0`), online.
    Lvconvert(lvm_cli::lvconvert::LvconvertArgs),
    /// Change a PV's attributes: allocatable (`-x`), tags (`--addtag host:NAME` names its
    /// storage host).
    Pvchange(lvm_cli::pvchange::PvchangeArgs),
    /// Move every extent off a PV, online (--abort to undo a killed move).
    Pvmove(lvm_cli::pvmove::PvmoveArgs),
    /// Remove LVs (active ones are deactivated first, with --yes).
    Lvremove(lvm_cli::lvremove::LvremoveArgs),
    /// Rename an LV.
    Lvrename(lvm_cli::lvremove::LvrenameArgs),
    /// Show physical volumes in lvm2's pvdisplay layout.
    Pvdisplay(lvm_cli::display::PvdisplayArgs),
    /// Show volume groups in lvm2's vgdisplay layout.
    Vgdisplay(lvm_cli::display::VgdisplayArgs),
    /// Show logical volumes in lvm2's lvdisplay layout.
    Lvdisplay(lvm_cli::display::LvdisplayArgs),
    /// Activate (`-ay`) or deactivate (`-an`) LVs as the daemon's devices.
    Lvchange(lvm_cli::activate::LvchangeArgs),
    /// Activate (`-ay`) or deactivate (`-an`) every LV of VGs.
    Vgchange(lvm_cli::activate::VgchangeArgs),
    /// Print a shell completion script (`volmgr completions bash > /etc/bash_completion.d/volmgr`).
    Completions(docs_cmd::CompletionsArgs),
    /// Write the manual pages (volmgr.8 and one per subcommand) into a directory.
    Manpages(docs_cmd::ManpagesArgs),
}

fn main() -> ExitCode {
    // Library warnings (a dropped connection, a failed leg...) go to stderr, which is the
    // journal under systemd; RUST_LOG overrides the level.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    // lvm2 exits 5 when a command fails; so do our LVM verbs.
    let lvm_verb = !matches!(
        cli.cmd,
        Cmd::Table(_)
            | Cmd::Serve(_)
            | Cmd::Daemon(_)
            | Cmd::Dev(_)
            | Cmd::Pool(_)
            | Cmd::Repl(_)
            | Cmd::Completions(_)
            | Cmd::Manpages(_)
    );
    let r = match cli.cmd {
        Cmd::Table(c) => table_cmd::run(c),
        Cmd::Serve(a) => serve::run(a),
        Cmd::Daemon(a) => daemon_cmd::run(a),
        Cmd::Dev(c) => dev::run(c),
        Cmd::Pool(c) => pool::run(c),
        Cmd::Repl(c) => repl::run(c),
        Cmd::Pvcreate(a) => lvm_cli::pv::pvcreate(a),
        Cmd::Pvremove(a) => lvm_cli::pv::pvremove(a),
        Cmd::Pvs(a) => lvm_cli::pv::pvs(a),
        Cmd::Pvresize(a) => lvm_cli::pv::pvresize(a),
        Cmd::Vgcreate(a) => lvm_cli::vg::vgcreate(a),
        Cmd::Vgextend(a) => lvm_cli::vg::vgextend(a),
        Cmd::Vgreduce(a) => lvm_cli::vg::vgreduce(a),
        Cmd::Vgrename(a) => lvm_cli::vg::vgrename(a),
        Cmd::Vgcfgrestore(a) => lvm_cli::vg::vgcfgrestore(a),
        Cmd::Vgremove(a) => lvm_cli::vg::vgremove(a),
        Cmd::Vgs(a) => lvm_cli::vg::vgs(a),
        Cmd::Vgck(a) => lvm_cli::vg::vgck(a),
        Cmd::Vgcfgbackup(a) => lvm_cli::vg::vgcfgbackup(a),
        Cmd::Lvs(a) => lvm_cli::lv::lvs(a),
        Cmd::Lvcreate(a) => lvm_cli::lvcreate::lvcreate(*a),
        Cmd::Lvextend(a) => lvm_cli::lvresize::lvextend(a),
        Cmd::Lvresize(a) => lvm_cli::lvresize::lvresize(a),
        Cmd::Lvreduce(a) => lvm_cli::lvresize::lvreduce(a),
        Cmd::Lvconvert(a) => lvm_cli::lvconvert::lvconvert(a),
        Cmd::Pvchange(a) => lvm_cli::pvchange::pvchange(a),
        Cmd::Pvmove(a) => lvm_cli::pvmove::pvmove(a),
        Cmd::Lvremove(a) => lvm_cli::lvremove::lvremove(a),
        Cmd::Lvrename(a) => lvm_cli::lvremove::lvrename(a),
        Cmd::Pvdisplay(a) => lvm_cli::display::pvdisplay(a),
        Cmd::Vgdisplay(a) => lvm_cli::display::vgdisplay(a),
        Cmd::Lvdisplay(a) => lvm_cli::display::lvdisplay(a),
        Cmd::Lvchange(a) => lvm_cli::activate::lvchange(a),
        Cmd::Vgchange(a) => lvm_cli::activate::vgchange(a),
        Cmd::Completions(a) => docs_cmd::completions(a),
        Cmd::Manpages(a) => docs_cmd::manpages(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volmgr: {e:#}");
            // The LVM verbs exit as lvm2 does (5 for a failed command, or what the verb says).
            let fallback = if lvm_verb {
                ExitCode::from(5)
            } else {
                ExitCode::FAILURE
            };
            e.downcast_ref::<lvm_cli::vg::LvmStatus>()
                .map_or(fallback, |s| ExitCode::from(s.code))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_tree_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
