//! NBD server limits on the command line (`serve`, `dev create`, `daemon`), and the file
//! descriptor limit a server with many clients needs.

use anyhow::{Context, Result};
use clap::Args;
use ublk_target::control::NbdOverrides;

/// Limits of an NBD export: one hostile or broken client must not take the server's memory
/// or connections. Unset options keep the default (the daemon's own, for `dev create`).
#[derive(Args, Clone, Debug, Default)]
pub struct NbdLimitArgs {
    /// Most NBD clients connected at once; one more is closed before the greeting
    /// [default: 1024].
    #[arg(long, value_name = "N")]
    pub nbd_max_connections: Option<usize>,
    /// Memory for NBD request and reply buffers in flight, all clients together (`256M`,
    /// `1G`...); when it is used up, clients wait. At least 64M [default: 256M].
    #[arg(long, value_name = "SIZE")]
    pub nbd_memory: Option<String>,
    /// Close an NBD connection that sent nothing and has nothing in flight for this many
    /// seconds; 0 never does (kernel and qemu clients stay silent while their disk is idle)
    /// [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub nbd_idle_timeout: Option<u64>,
    /// Seconds a new client has to finish the NBD handshake [default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub nbd_handshake_timeout: Option<u64>,
}

impl NbdLimitArgs {
    /// The options given, as overrides of a default.
    pub fn overrides(&self) -> Result<NbdOverrides> {
        let memory = match &self.nbd_memory {
            Some(s) => Some(
                tables::units::parse_size(s)
                    .map(|b| b.0)
                    .with_context(|| format!("--nbd-memory '{s}'"))?,
            ),
            None => None,
        };
        let o = NbdOverrides {
            max_connections: self.nbd_max_connections,
            memory_budget_bytes: memory,
            idle_timeout_ms: self.nbd_idle_timeout.map(|s| s.saturating_mul(1000)),
            handshake_timeout_ms: self.nbd_handshake_timeout.map(|s| s.saturating_mul(1000)),
        };
        // Refuse nonsense here, with the option's own words, not at the daemon.
        o.apply(&nbd::Limits::default())
            .map_err(|e| anyhow::anyhow!("NBD limits: {e}"))?;
        Ok(o)
    }

    /// The limits these options give over the built-in defaults.
    pub fn limits(&self) -> Result<nbd::Limits> {
        self.overrides()?
            .apply(&nbd::Limits::default())
            .map_err(|e| anyhow::anyhow!("NBD limits: {e}"))
    }
}

/// TLS on NBD exports, as qemu-nbd and nbdkit take it.
#[derive(Args, Clone, Debug, Default)]
pub struct NbdTlsArgs {
    /// TLS on NBD exports: off, on (clients may start it) or require (clients must)
    /// [default: off].
    #[arg(long, value_name = "MODE")]
    pub tls: Option<String>,
    /// Directory with server-cert.pem and server-key.pem (mode 0600), and ca-cert.pem for
    /// --tls-verify-peer (qemu-nbd's and nbdkit's layout).
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<std::path::PathBuf>,
    /// Only clients with a certificate that ca-cert.pem signed may connect.
    #[arg(long)]
    pub tls_verify_peer: bool,
}

impl NbdTlsArgs {
    /// The TLS configuration these options give (`None`: off).
    pub fn tls(&self) -> Result<Option<nbd::Tls>> {
        let mode = match self.tls.as_deref().unwrap_or("off") {
            "off" => nbd::TlsMode::Off,
            "on" => nbd::TlsMode::On,
            "require" => nbd::TlsMode::Require,
            other => anyhow::bail!("--tls {other}: use off, on or require"),
        };
        if mode == nbd::TlsMode::Off {
            if self.tls_certificates.is_some() || self.tls_verify_peer {
                anyhow::bail!("--tls-certificates and --tls-verify-peer need --tls on or require");
            }
            return Ok(None);
        }
        let dir = self
            .tls_certificates
            .as_deref()
            .context("--tls needs --tls-certificates DIR")?;
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        nbd::Tls::load(mode, &dir, self.tls_verify_peer)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("--tls-certificates: {e}"))
    }
}

/// Raises this process's open-file limit to its hard limit: every NBD client is a socket,
/// and the default soft limit (1024) would refuse clients long before `--nbd-max-connections`.
pub fn raise_fd_limit() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 && r.rlim_cur < r.rlim_max {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}
