//! `volmgr repl`: asynchronous replication of a thin volume to a pool on another daemon
//! (the `replicate` crate's engines, run by the daemon: [`service`]).
//!
//! A walkthrough is in `examples/replication.md`.

pub mod config;
pub mod lv;
pub mod service;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tables::units::parse_size;
use ublk_target::control::Request;

use crate::client::{call, expect_text, StateDir};
use config::{ReplConfig, Role};

#[derive(Subcommand)]
pub enum ReplCmd {
    /// Replicate a thin volume of this daemon to a secondary: a snapshot every interval,
    /// the blocks changed since the last one the secondary completed shipped over one
    /// TLS connection (resumes from that snapshot after a cut or a restart).
    Primary {
        #[command(flatten)]
        vol: VolumeArgs,
        /// The secondary's `HOST:PORT`.
        #[arg(long)]
        peer: String,
        /// Name the secondary's certificate must carry (default: HOST of --peer).
        #[arg(long)]
        server_name: Option<String>,
        /// Time between replication snapshots (`500ms`, `5s`, `1m`, `1h`; at least 100ms).
        #[arg(long, default_value = "30s", value_parser = parse_interval)]
        interval: u64,
        /// Most bytes per second shipped (`50M`).
        #[arg(long)]
        bwlimit: Option<String>,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Receive a volume from a primary into a thin device of this daemon's pool (the copy,
    /// rebuilt from the last complete snapshot every interval: keep it inactive until
    /// `promote`).
    Secondary {
        #[command(flatten)]
        vol: VolumeArgs,
        /// `ADDR:PORT` to listen on for the primary.
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        sd: StateDir,
    },
    /// State of every replicated volume of this daemon, as `rbd mirror image status`:
    /// state, last synced snapshot and its time, seconds behind, pending, throughput.
    Status {
        /// Only this volume.
        volume: Option<String>,
        /// JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Stop replicating a volume (it resumes from the last common snapshot when started
    /// again).
    Stop {
        volume: String,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Make the secondary's copy the writable volume, at its last complete snapshot. Without
    /// --force only once the primary stopped replicating (demoted).
    Promote {
        volume: String,
        /// The primary is lost: promote anyway (its writes after that snapshot are lost).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Make this primary a secondary: ship one final snapshot (the volume must be
    /// inactive), then stop; after the peer's promote, `repl secondary` resyncs it from the
    /// last common snapshot.
    Demote {
        volume: String,
        /// Longest wait for the final snapshot to reach the secondary.
        #[arg(long, value_name = "SECONDS", default_value_t = 60)]
        timeout: u64,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Forget a replicated volume on this side and release its replication snapshots.
    Remove {
        volume: String,
        /// Confirm.
        #[arg(long)]
        yes: bool,
        #[command(flatten)]
        sd: StateDir,
    },
}

/// The volume and the link, on both sides.
#[derive(Args)]
pub struct VolumeArgs {
    /// A thin LV (`VG/LV`) instead of --pool/--thin/--size: its pool is activated if it is
    /// not; on a secondary, the LV that holds the copy (inactive until `promote`).
    #[arg(long, value_name = "VG/LV", conflicts_with_all = ["pool", "thin", "size"])]
    lv: Option<String>,
    /// The name both sides know the volume by (default with --lv: `VG-LV`, as device-mapper
    /// names it).
    #[arg(long, required_unless_present = "lv")]
    volume: Option<String>,
    /// The daemon's thin-pool device.
    #[arg(long, required_unless_present = "lv")]
    pool: Option<String>,
    /// The volume's thin id in that pool (on a secondary: the copy's).
    #[arg(long, required_unless_present = "lv")]
    thin: Option<u32>,
    /// Volume size (`1G`, `512M`; the same on both sides).
    #[arg(long, required_unless_present = "lv")]
    size: Option<String>,
    #[command(flatten)]
    dev: crate::lvm_cli::devices::DeviceArgs,
    /// Directory with the x509 files (as the NBD export's: ca-cert.pem, and
    /// server-cert.pem/server-key.pem on a secondary, client-cert.pem/client-key.pem on a
    /// primary).
    #[arg(long, required_unless_present = "insecure")]
    tls_dir: Option<PathBuf>,
    /// No TLS and no authentication of the peer: only on a private test link.
    #[arg(long)]
    insecure: bool,
}

/// `500ms`, `5s`, `2m`, `1h` or plain seconds, in milliseconds.
fn parse_interval(s: &str) -> Result<u64, String> {
    let (num, mul) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let v: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}': a time such as 500ms, 5s, 1m or 1h"))?;
    let ms = v
        .checked_mul(mul)
        .ok_or_else(|| format!("'{s}': too long"))?;
    if ms < 100 {
        return Err(format!("'{s}': at least 100ms"));
    }
    Ok(ms)
}

fn service(sd: &StateDir, args: Vec<String>) -> Result<String> {
    expect_text(call(
        sd,
        Request::Service {
            service: "repl".into(),
            args,
        },
    )?)
}

/// The replicated volume of this daemon that ships or receives thin `thin` of pool device
/// `pool`, if one does (none when no daemon answers).
pub fn replicating(sd: &StateDir, pool: &str, thin: u32) -> Option<String> {
    if !sd.state_dir.join("control.sock").exists() {
        return None;
    }
    let text = service(sd, vec!["status".into()]).ok()?;
    let list: Vec<serde_json::Value> = serde_json::from_str(&text).ok()?;
    list.iter()
        .find(|s| s["pool"].as_str() == Some(pool) && s["thin"].as_u64() == Some(thin.into()))
        .and_then(|s| s["volume"].as_str().map(str::to_string))
}

fn config_of(vol: VolumeArgs, role: Role, sd: &StateDir) -> Result<ReplConfig> {
    let (volume, pool, thin, size) = match (&vol.lv, vol.pool, vol.thin, &vol.size) {
        (Some(name), ..) => {
            let t = lv::resolve(name, &vol.dev, sd, role)?;
            (vol.volume.unwrap_or(t.volume), t.pool, t.thin, t.size)
        }
        (None, Some(pool), Some(thin), Some(size)) => {
            let size = parse_size(size)
                .with_context(|| format!("--size {size}"))?
                .0;
            let volume = vol.volume.context("--volume is needed without --lv")?;
            (volume, pool, thin, size)
        }
        _ => bail!("name the volume with --lv VG/LV, or with --volume, --pool, --thin and --size"),
    };
    let tls_dir = match vol.tls_dir {
        Some(d) => {
            Some(std::fs::canonicalize(&d).with_context(|| format!("--tls-dir {}", d.display()))?)
        }
        None => None,
    };
    Ok(ReplConfig {
        volume,
        role,
        pool,
        thin,
        size,
        snap_ids: [0, 0],
        peer: None,
        server_name: None,
        listen: None,
        tls_dir,
        insecure: vol.insecure,
        interval_ms: 0,
        bwlimit: None,
        running: true,
    })
}

fn start(sd: &StateDir, c: &ReplConfig) -> Result<()> {
    let json = serde_json::to_string(c)?;
    println!("{}", service(sd, vec!["start".into(), json])?);
    Ok(())
}

/// Runs `volmgr repl ...`.
pub fn run(cmd: ReplCmd) -> Result<()> {
    match cmd {
        ReplCmd::Primary {
            vol,
            peer,
            server_name,
            interval,
            bwlimit,
            sd,
        } => {
            let mut c = config_of(vol, Role::Primary, &sd)?;
            c.peer = Some(peer);
            c.server_name = server_name;
            c.interval_ms = interval;
            c.bwlimit = match bwlimit {
                Some(b) => Some(parse_size(&b).with_context(|| format!("--bwlimit {b}"))?.0),
                None => None,
            };
            start(&sd, &c)
        }
        ReplCmd::Secondary { vol, listen, sd } => {
            let mut c = config_of(vol, Role::Secondary, &sd)?;
            c.listen = Some(listen);
            start(&sd, &c)
        }
        ReplCmd::Status { volume, json, sd } => {
            let text = service(&sd, vec!["status".into()])?;
            let mut list: Vec<serde_json::Value> =
                serde_json::from_str(&text).context("the daemon's status")?;
            if let Some(v) = &volume {
                list.retain(|s| s["volume"].as_str() == Some(v.as_str()));
                if list.is_empty() {
                    bail!("no replicated volume named '{v}' here");
                }
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                print_status(&list);
            }
            Ok(())
        }
        ReplCmd::Stop { volume, sd } => {
            println!("{}", service(&sd, vec!["stop".into(), volume])?);
            Ok(())
        }
        ReplCmd::Promote { volume, force, sd } => {
            let mut a = vec!["promote".to_string(), volume];
            if force {
                a.push("force".into());
            }
            println!("{}", service(&sd, a)?);
            Ok(())
        }
        ReplCmd::Demote {
            volume,
            timeout,
            sd,
        } => {
            let a = vec!["demote".into(), volume, timeout.to_string()];
            println!("{}", service(&sd, a)?);
            Ok(())
        }
        ReplCmd::Remove { volume, yes, sd } => {
            if !yes {
                bail!(
                    "repl remove {volume} forgets its replication and releases its snapshots: \
                     the next start ships the whole volume again; add --yes"
                );
            }
            println!("{}", service(&sd, vec!["remove".into(), volume])?);
            Ok(())
        }
    }
}

fn print_status(list: &[serde_json::Value]) {
    for s in list {
        let str_of = |k: &str| s[k].as_str().unwrap_or("").to_string();
        let num = |k: &str| s[k].as_u64().unwrap_or(0);
        println!("{}:", str_of("volume"));
        println!("  role:                 {}", str_of("role"));
        println!("  state:                {}", str_of("state"));
        println!("  pool/thin:            {}/{}", str_of("pool"), num("thin"));
        if let Some(p) = s["peer"].as_str() {
            println!("  peer:                 {p}");
        }
        if let Some(l) = s["listen"].as_str() {
            println!("  listening on:         {l}");
        }
        let last = num("last_synced_snapshot");
        if last == 0 {
            println!("  last synced snapshot: none");
        } else {
            let lag = num("lag_ms");
            if lag > 0 {
                println!(
                    "  last synced snapshot: {last} ({:.1} s behind)",
                    lag as f64 / 1000.0
                );
            } else {
                println!(
                    "  last synced snapshot: {last} ({} s behind)",
                    num("seconds_behind")
                );
            }
        }
        println!(
            "  pending:              {} blocks, {} bytes",
            num("blocks_pending"),
            num("bytes_pending")
        );
        println!("  throughput:           {} B/s", num("throughput"));
        println!(
            "  shipped:              {} bytes in {} intervals",
            num("bytes_shipped"),
            num("intervals")
        );
        if let Some(e) = s["last_error"].as_str() {
            println!("  last error:           {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_interval;

    #[test]
    fn intervals_take_units_and_a_floor() {
        assert_eq!(parse_interval("500ms"), Ok(500));
        assert_eq!(parse_interval("5s"), Ok(5000));
        assert_eq!(parse_interval("2m"), Ok(120_000));
        assert_eq!(parse_interval("1h"), Ok(3_600_000));
        assert_eq!(parse_interval("3"), Ok(3000));
        assert!(parse_interval("50ms").is_err());
        assert!(parse_interval("soon").is_err());
    }
}
