//! `volmgr daemon`: run the volume daemon.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;

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
}

pub fn run(a: DaemonArgs) -> Result<()> {
    if a.detach {
        ublk_target::signals::detach().context("detaching")?;
    }
    ublk_target::signals::block_termination_signals().context("blocking signals")?;
    let ublk_available = !a.no_ublk && Path::new("/dev/ublk-control").exists();
    let cfg = ublk_target::daemon::DaemonConfig {
        state_dir: a.state_dir.clone(),
        ublk_available,
        private_mount_ns: true,
    };
    ublk_target::daemon::enter_private_mount_ns().context("entering a private mount namespace")?;
    let d = Arc::new(
        ublk_target::daemon::Daemon::open(
            cfg,
            volmgr::registry(),
            Arc::new(extents::FileResolver::default()),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    for p in d.restore().map_err(|e| anyhow::anyhow!("{e}"))? {
        eprintln!("volmgr daemon: could not restore {p}");
    }
    let d2 = d.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = ublk_target::signals::wait_termination_signal();
            eprintln!("volmgr daemon: signal {sig}: stopping");
            d2.request_stop();
        })
        .context("starting the signal thread")?;
    eprintln!(
        "volmgr daemon: ready; control socket {} (ublk {})",
        d.socket_path().display(),
        if ublk_available {
            "available"
        } else {
            "not available: NBD only"
        }
    );
    d.serve_control().map_err(|e| anyhow::anyhow!("{e}"))?;
    let problems = d.shutdown();
    for p in &problems {
        eprintln!("volmgr daemon: {p}");
    }
    if problems.is_empty() {
        Ok(())
    } else {
        bail!("{} device(s) did not stop cleanly", problems.len())
    }
}
