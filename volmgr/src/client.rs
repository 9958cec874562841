//! Talking to the daemon: the state directory option and one request/reply.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use ublk_target::control::{self, Reply, Request};

#[derive(Args, Clone, Debug)]
pub struct StateDir {
    /// State directory of the daemon to talk to.
    #[arg(long, env = "VOLMGR_STATE_DIR", default_value = "/var/lib/volmgr")]
    pub state_dir: PathBuf,
}

/// Sends one request to the daemon of `sd`.
pub fn call(sd: &StateDir, req: Request) -> Result<Reply> {
    let sock = sd.state_dir.join("control.sock");
    Ok(control::call(&sock, &req)?)
}

/// The text of an `Ok` reply; an `Error` reply becomes an error.
pub fn expect_text(rep: Reply) -> Result<String> {
    match rep {
        Reply::Ok { text } => Ok(text),
        Reply::Error { message } => bail!("{message}"),
        Reply::Devices { .. } => bail!("unexpected device list from the daemon"),
    }
}
