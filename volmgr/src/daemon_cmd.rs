//! `volmgr daemon`: run the volume daemon.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use ublk_target::daemon::{Daemon, DaemonConfig};

use crate::lvm_cli::lvrepair::FaultPolicy;
use crate::lvm_cli::monitor::Monitor;
use crate::nbd_opts::{raise_fd_limit, NbdLimitArgs, NbdTlsArgs};

#[derive(Args)]
pub struct DaemonArgs {
    /// State directory: lock, control socket, persisted devices.
    #[arg(long, env = "VOLMGR_STATE_DIR", default_value = "/var/lib/volmgr")]
    state_dir: PathBuf,
    /// Detach and run in the background (the foreground is systemd-friendly).
    #[arg(long)]
    detach: bool,
    /// Never use ublk (export devices over NBD only).
    #[arg(long)]
    no_ublk: bool,
    /// Longest a control command waits for a device's I/O (suspend, the final flush of a
    /// remove, a message) before it fails with an error naming the device.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    io_timeout: u64,
    /// Limits of every NBD export (`dev create` may set its own over these).
    #[command(flatten)]
    nbd: NbdLimitArgs,
    #[command(flatten)]
    tls: NbdTlsArgs,
    /// What the raid monitor does when a leg of an LVM raid LV fails: `warn` (log it) or
    /// `allocate` (replace the image from free space on a host no other image uses, and
    /// rebuild), as lvm2's raid_fault_policy; a `raid_fault_policy:warn|allocate` tag on the
    /// LV or its VG overrides it.
    #[arg(long, value_name = "warn|allocate", default_value = "warn")]
    raid_fault_policy: String,
    /// How often the raid monitor looks at the devices (0: no monitor).
    #[arg(long, value_name = "SECONDS", default_value_t = 2)]
    monitor_interval: u64,
    /// Where the monitor looks for PVs (as the LVM verbs).
    #[command(flatten)]
    dev: crate::lvm_cli::DeviceArgs,
}

/// Runs the daemon until SIGTERM/SIGINT or a shutdown request. Exits non-zero when a device
/// could not be restored (and is still failed at exit) or did not stop cleanly.
pub fn run(a: DaemonArgs) -> Result<()> {
    if a.detach {
        ublk_target::signals::detach().context("detaching")?;
    }
    // Before any thread starts: SIGINT/SIGTERM are taken synchronously by the signal thread
    // below, even one that arrives during start-up (it stays pending until then).
    ublk_target::signals::block_termination_signals().context("blocking signals")?;
    let fault_policy = match a.raid_fault_policy.as_str() {
        "warn" => FaultPolicy::Warn,
        "allocate" => FaultPolicy::Allocate,
        other => bail!("--raid-fault-policy {other}: use warn or allocate"),
    };
    let mut cfg = DaemonConfig::new(&a.state_dir);
    cfg.ublk_available &= !a.no_ublk;
    cfg.io_timeout = Duration::from_secs(a.io_timeout.max(1));
    cfg.nbd_limits = a.nbd.limits()?;
    cfg.nbd_tls = a.tls.tls()?;
    raise_fd_limit();
    let ublk_available = cfg.ublk_available;
    ublk_target::daemon::enter_private_mount_ns().context("entering a private mount namespace")?;
    let d = Arc::new(
        Daemon::open(
            cfg,
            volmgr::registry(),
            // The daemon's working directory means nothing to a table: relative paths are
            // refused (the CLI makes them absolute before sending a table).
            Arc::new(
                extents::FileResolver::default().relative_paths(extents::RelativePaths::Refuse),
            ),
        )
        .with_context(|| format!("starting the daemon on {}", a.state_dir.display()))?,
    );
    // The signal thread exists before restore, so a stop during a long restore is honoured
    // between two devices.
    let d2 = d.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = ublk_target::signals::wait_termination_signal();
            eprintln!("volmgr daemon: signal {sig}: stopping");
            d2.request_stop();
        })
        .context("starting the signal thread")?;
    let problems = d.restore().context("restoring devices")?;
    for p in &problems {
        eprintln!("volmgr daemon: could not restore {p}");
    }
    if !d.stopping() {
        eprintln!(
            "volmgr daemon: ready; control socket {} (ublk {}){}",
            d.socket_path().display(),
            if ublk_available {
                "available"
            } else {
                "not available: NBD only"
            },
            if problems.is_empty() {
                String::new()
            } else {
                format!(
                    "; {} device(s) failed to come up: see `volmgr dev list`",
                    problems.len()
                )
            }
        );
    }
    if !d.stopping() {
        // Ready only now: every recorded device is up or known to have failed.
        let failed_now = d.failed_devices().len();
        crate::systemd::notify(&format!(
            "READY=1\nSTATUS={} device(s) up, {failed_now} failed",
            d.device_count().saturating_sub(failed_now)
        ));
    }
    if !d.stopping() {
        // Replication engines hold their pools: they start once the devices are up.
        let repl = Arc::new(
            crate::repl::service::ReplService::open(&a.state_dir)
                .map_err(anyhow::Error::msg)
                .context("reading the replication records")?,
        );
        d.add_service("repl", repl.clone());
        for p in repl.resume(&d) {
            eprintln!("volmgr daemon: {p}");
        }
    }
    if a.monitor_interval > 0 && !d.stopping() {
        let mut m = Monitor::new(
            crate::client::StateDir {
                state_dir: a.state_dir.clone(),
            },
            a.dev.clone(),
            fault_policy,
        );
        let every = Duration::from_secs(a.monitor_interval);
        let weak = Arc::downgrade(&d);
        std::thread::Builder::new()
            .name("raid-monitor".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                match weak.upgrade() {
                    Some(d) if !d.stopping() => {}
                    _ => return,
                }
                m.round();
            })
            .context("starting the raid monitor")?;
    }
    d.serve_control().context("serving the control socket")?;
    crate::systemd::notify("STOPPING=1");
    let stop_problems = d.shutdown();
    for p in &stop_problems {
        eprintln!("volmgr daemon: {p}");
    }
    let failed = d.failed_devices();
    for (n, why) in &failed {
        eprintln!("volmgr daemon: {n} is still failed: {why}");
    }
    if !stop_problems.is_empty() || !failed.is_empty() {
        bail!(
            "{} device(s) did not stop cleanly, {} device(s) left failed",
            stop_problems.len(),
            failed.len()
        );
    }
    Ok(())
}
