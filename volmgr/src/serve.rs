//! `volmgr serve`: one table in the foreground.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use tables::DeviceRef;
use ublk_target::frontend::{Frontend, FrontendKind};

use crate::nbd_opts::{raise_fd_limit, NbdLimitArgs, NbdTlsArgs};
use crate::table_cmd::parse_table;

#[derive(Args)]
pub struct ServeArgs {
    /// Table file ('-' for standard input).
    file: PathBuf,
    /// Export over NBD on this TCP address (HOST:PORT).
    #[arg(long, value_name = "ADDR")]
    nbd: Option<String>,
    /// Export over NBD on this unix socket.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Serve as /dev/ublkbN (needs the ublk_drv kernel module).
    #[arg(long)]
    ublk: bool,
    /// ublk device id (default: the next free one).
    #[arg(long, value_name = "N")]
    ublk_id: Option<u32>,
    /// NBD export name.
    #[arg(long, default_value = "volume")]
    export: String,
    #[command(flatten)]
    limits: NbdLimitArgs,
    #[command(flatten)]
    tls: NbdTlsArgs,
}

fn build_device(file: &Path) -> Result<DeviceRef> {
    let t = parse_table(file)?;
    let resolver = extents::FileResolver::default();
    t.build(&volmgr::registry(), &resolver)
        .with_context(|| file.display().to_string())
}

pub fn run(a: ServeArgs) -> Result<()> {
    // Before any thread starts: SIGINT/SIGTERM are taken synchronously by sigwait below.
    ublk_target::signals::block_termination_signals().context("blocking signals")?;
    let kinds = [a.nbd.is_some(), a.unix.is_some(), a.ublk]
        .iter()
        .filter(|x| **x)
        .count();
    if kinds != 1 {
        bail!("give exactly one of --nbd ADDR, --unix PATH or --ublk");
    }
    let limits = a.limits.limits()?;
    let tls = a.tls.tls()?;
    if tls.is_some() && a.ublk {
        bail!("--tls is for NBD exports (--nbd, --unix), not --ublk");
    }
    raise_fd_limit();
    let dev = build_device(&a.file)?;
    let kind = if let Some(addr) = a.nbd {
        FrontendKind::Nbd(addr)
    } else if let Some(p) = a.unix {
        FrontendKind::NbdUnix(p)
    } else {
        FrontendKind::Ublk(a.ublk_id)
    };
    let front = Frontend::start(&a.export, dev.clone(), kind, false, &limits, tls.as_ref())
        .context("starting the front end")?;
    eprintln!(
        "volmgr: serving {} ({} bytes) at {}",
        a.file.display(),
        dev.size().0,
        front.path()
    );
    println!("{}", front.path());
    let sig = ublk_target::signals::wait_termination_signal();
    eprintln!("volmgr: signal {sig}: flushing and stopping");
    front.stop().context("stopping the front end")?;
    match iort::block_on(dev.flush()) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("final flush failed: {e}"),
        Err(e) => bail!("final flush failed: {e}"),
    }
}
