//! `volmgr`: compose volumes from device-mapper tables and serve them as block devices.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tables::table::Table;
use tables::DeviceRef;
use ublk_target::control::{self, DeviceInfo, Reply, Request};
use ublk_target::frontend::{Frontend, FrontendKind};

#[derive(Parser)]
#[command(
    name = "volmgr",
    version,
    about = "Compose volumes from device-mapper tables and serve them as /dev/ublkbN or over NBD"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Work with table files.
    #[command(subcommand)]
    Table(TableCmd),
    /// Serve one table in the foreground until SIGINT/SIGTERM (then flush and exit 0).
    Serve(ServeArgs),
    /// Run the volume daemon (control socket, named devices, crash recovery).
    Daemon(DaemonArgs),
    /// Manage the daemon's devices (dmsetup-like).
    #[command(subcommand)]
    Dev(DevCmd),
    /// Thin-pool metadata tools (the pool must not be in use).
    #[command(subcommand)]
    Pool(PoolCmd),
}

#[derive(Subcommand)]
enum PoolCmd {
    /// Verify every metadata structure and recount every reference (as thin_check).
    Check {
        /// Metadata device or file.
        metadata: PathBuf,
        /// JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Write the metadata as a readable dump (text, or JSON that `pool restore` reads).
    Dump {
        /// Metadata device or file.
        metadata: PathBuf,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Dump the held metadata snapshot (reserve_metadata_snap) instead of the live root.
        #[arg(long)]
        metadata_snap: bool,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write metadata rebuilt from a JSON dump onto a metadata device (overwrites it).
    Restore {
        /// JSON dump (from `pool dump --json`).
        #[arg(short, long)]
        input: PathBuf,
        /// Metadata device or file to overwrite.
        metadata: PathBuf,
        /// Confirm overwriting the metadata device.
        #[arg(long)]
        yes: bool,
    },
    /// Grow a live pool: its data and/or metadata device (a file is extended here; a block
    /// device must have been grown first, with lvextend or the like), then its table is
    /// reloaded so the pool takes the new space. Shrinking is refused.
    Resize {
        /// The pool's device name in the daemon.
        name: String,
        /// New data device size (`512M`, `2G`, ...).
        #[arg(long)]
        data_size: Option<String>,
        /// New metadata device size.
        #[arg(long)]
        metadata_size: Option<String>,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Rebuild what can be found in damaged metadata into a new metadata device.
    Repair {
        /// Damaged metadata (read only).
        input: PathBuf,
        /// New metadata device or file (overwritten).
        output: PathBuf,
        /// Confirm overwriting the output device.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Subcommand)]
enum TableCmd {
    /// Validate a table and print it normalized; exit 1 with the error otherwise.
    Check {
        /// Table file ('-' for standard input).
        file: PathBuf,
        /// Print the table as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct ServeArgs {
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
}

#[derive(Args)]
struct DaemonArgs {
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

#[derive(Args, Clone)]
struct StateDir {
    /// State directory of the daemon to talk to.
    #[arg(long, env = "VOLMGR_STATE_DIR", default_value = "/var/lib/volmgr")]
    state_dir: PathBuf,
}

#[derive(Subcommand)]
enum DevCmd {
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

fn read_table_text(file: &Path) -> Result<String> {
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

fn parse_table(file: &Path) -> Result<Table> {
    let text = read_table_text(file)?;
    Table::parse(&text, &volmgr::registry()).map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

fn table_check(file: &Path, json: bool) -> Result<()> {
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

fn build_device(file: &Path) -> Result<DeviceRef> {
    let t = parse_table(file)?;
    let resolver = extents::FileResolver::default();
    t.build(&volmgr::registry(), &resolver)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

fn serve(a: ServeArgs) -> Result<()> {
    // Before any thread starts: SIGINT/SIGTERM are taken synchronously by sigwait below.
    ublk_target::signals::block_termination_signals().context("blocking signals")?;
    let kinds = [a.nbd.is_some(), a.unix.is_some(), a.ublk]
        .iter()
        .filter(|x| **x)
        .count();
    if kinds != 1 {
        bail!("give exactly one of --nbd ADDR, --unix PATH or --ublk");
    }
    let dev = build_device(&a.file)?;
    let kind = if let Some(addr) = a.nbd {
        FrontendKind::Nbd(addr)
    } else if let Some(p) = a.unix {
        FrontendKind::NbdUnix(p)
    } else {
        FrontendKind::Ublk(a.ublk_id)
    };
    let front =
        Frontend::start(&a.export, dev.clone(), kind, false).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "volmgr: serving {} ({} bytes) at {}",
        a.file.display(),
        dev.size().0,
        front.path()
    );
    println!("{}", front.path());
    let sig = ublk_target::signals::wait_termination_signal();
    eprintln!("volmgr: signal {sig}: flushing and stopping");
    front.stop().map_err(|e| anyhow::anyhow!("{e}"))?;
    match iort::block_on(dev.flush()) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => bail!("final flush failed: {e}"),
        Err(e) => bail!("final flush failed: {e}"),
    }
}

fn daemon(a: DaemonArgs) -> Result<()> {
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

fn call(sd: &StateDir, req: Request) -> Result<Reply> {
    let sock = sd.state_dir.join("control.sock");
    Ok(control::call(&sock, &req)?)
}

fn expect_text(rep: Reply) -> Result<String> {
    match rep {
        Reply::Ok { text } => Ok(text),
        Reply::Error { message } => bail!("{message}"),
        Reply::Devices { .. } => bail!("unexpected device list from the daemon"),
    }
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
    }
    Ok(())
}

fn dev(cmd: DevCmd) -> Result<()> {
    match cmd {
        DevCmd::Create {
            name,
            table,
            ublk_id,
            nbd,
            sd,
        } => {
            let text = read_table_text(&table)?;
            // Validate locally first so errors name the file.
            Table::parse(&text, &volmgr::registry())
                .map_err(|e| anyhow::anyhow!("{}: {e}", table.display()))?;
            let r = call(
                &sd,
                Request::Create {
                    name,
                    table: text,
                    ublk_id,
                    nbd,
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
        DevCmd::Reload { name, table, sd } => {
            let text = read_table_text(&table)?;
            Table::parse(&text, &volmgr::registry())
                .map_err(|e| anyhow::anyhow!("{}: {e}", table.display()))?;
            println!(
                "{}",
                expect_text(call(&sd, Request::Reload { name, table: text })?)?
            );
        }
        DevCmd::Remove { name, force, sd } => {
            println!(
                "{}",
                expect_text(call(&sd, Request::Remove { name, force })?)?
            )
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

fn open_meta(path: &Path, writable: bool) -> Result<DeviceRef> {
    let opts = extents::OpenOptions {
        read_only: !writable,
        ..extents::OpenOptions::default()
    };
    let e = extents::FileExtent::open(path, opts)
        .with_context(|| format!("opening metadata device {}", path.display()))?;
    Ok(Arc::new(e))
}

fn block<T>(what: &str, f: impl std::future::Future<Output = T>) -> Result<T> {
    iort::block_on(f).with_context(|| format!("{what}: starting the I/O runtime"))
}

/// Grows one of a pool's devices to `want` bytes: extends a regular file, checks that a
/// block device is already that large. Returns the size before.
fn grow_pool_device(pool: &str, what: &str, dev: &str, want: u64) -> Result<u64> {
    let path = extents::FileResolver::locate(dev)
        .map_err(|e| anyhow::anyhow!("pool {pool}: {what} device {dev}: {e}"))?;
    let md = std::fs::metadata(&path)
        .with_context(|| format!("pool {pool}: {what} device {}", path.display()))?;
    let human = |b: u64| tables::units::human(tables::Bytes(b));
    if md.is_file() {
        let cur = md.len();
        if want < cur {
            bail!(
                "pool {pool}: {what} device {} is {} and cannot shrink to {}",
                path.display(),
                human(cur),
                human(want)
            );
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(want))
            .with_context(|| format!("pool {pool}: extending {}", path.display()))?;
        return Ok(cur);
    }
    // A block device: its size is what it is; say how to grow it.
    let f = std::fs::File::open(&path)
        .with_context(|| format!("pool {pool}: opening {}", path.display()))?;
    let cur = std::io::Seek::seek(&mut &f, std::io::SeekFrom::End(0))
        .with_context(|| format!("pool {pool}: size of {}", path.display()))?;
    if cur < want {
        bail!(
            "pool {pool}: {what} device {} is a block device of {}: grow it to {} first \
             (lvextend, or the storage it comes from), then run this again",
            path.display(),
            human(cur),
            human(want)
        );
    }
    Ok(cur)
}

fn pool_resize(
    name: &str,
    data_size: Option<String>,
    metadata_size: Option<String>,
    sd: &StateDir,
) -> Result<()> {
    if data_size.is_none() && metadata_size.is_none() {
        bail!("pool resize {name}: give --data-size and/or --metadata-size");
    }
    let size = |s: &str| -> Result<u64> {
        tables::units::parse_size(s)
            .map(|b| b.0)
            .map_err(|e| anyhow::anyhow!("'{s}': {e}"))
    };
    let text = expect_text(call(sd, Request::Table { name: name.into() })?)?;
    let table = Table::parse(&text, &volmgr::registry())
        .map_err(|e| anyhow::anyhow!("{name}: its table does not parse: {e}"))?;
    // The table is reloaded as it is: the pool finds its grown devices when the reload opens
    // them. Its length stays, so the pool device's own size does not change (its thin
    // volumes carry the I/O), and a kernel without ublk UPDATE_SIZE does not refuse it.
    let [seg] = &table.segments[..] else {
        bail!(
            "{name}: not a pool (its table has {} lines)",
            table.segments.len()
        );
    };
    if seg.target != "thin-pool" || seg.args.len() < 2 {
        bail!("{name}: not a pool (its table is a {} line)", seg.target);
    }
    let (meta, data) = (seg.args[0].clone(), seg.args[1].clone());
    let human = |b: u64| tables::units::human(tables::Bytes(b));
    if let Some(s) = &metadata_size {
        let want = size(s)?;
        let before = grow_pool_device(name, "metadata", &meta, want)?;
        println!(
            "{name}: metadata device {meta}: {} -> {}",
            human(before),
            human(want)
        );
    }
    if let Some(s) = &data_size {
        let want = size(s)?;
        let before = grow_pool_device(name, "data", &data, want)?;
        println!(
            "{name}: data device {data}: {} -> {}",
            human(before),
            human(want)
        );
    }
    let r = call(
        sd,
        Request::Reload {
            name: name.into(),
            table: table.to_string(),
        },
    )?;
    println!("{}", expect_text(r)?);
    println!(
        "{}",
        expect_text(call(sd, Request::Status { name: name.into() })?)?
    );
    Ok(())
}

fn pool(cmd: PoolCmd) -> Result<()> {
    match cmd {
        PoolCmd::Resize {
            name,
            data_size,
            metadata_size,
            sd,
        } => pool_resize(&name, data_size, metadata_size, &sd)?,
        PoolCmd::Check { metadata, json } => {
            let dev = open_meta(&metadata, false)?;
            let r = block("pool check", thin::tools::check(&dev))?
                .map_err(|e| anyhow::anyhow!("{}: {e}", metadata.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{}: transaction {} generation {}; {} thin device(s), {} mapped block(s); data {}/{} blocks, metadata {}/{} blocks",
                    metadata.display(),
                    r.transaction_id,
                    r.generation,
                    r.devices,
                    r.mapped_blocks,
                    r.data_used,
                    r.data_total,
                    r.meta_used,
                    r.meta_total
                );
                for e in &r.errors {
                    println!("error: {e}");
                }
            }
            if !r.clean {
                bail!(
                    "{}: {} metadata error(s)",
                    metadata.display(),
                    r.errors.len()
                );
            }
        }
        PoolCmd::Dump {
            metadata,
            json,
            metadata_snap,
            output,
        } => {
            let dev = open_meta(&metadata, false)?;
            let d = if metadata_snap {
                block("pool dump", thin::tools::dump_metadata_snap(&dev))?
                    .map_err(|e| anyhow::anyhow!("{}: {e}", metadata.display()))?
                    .with_context(|| {
                        format!("{}: no metadata snapshot is held", metadata.display())
                    })?
            } else {
                block("pool dump", thin::tools::dump(&dev))?
                    .map_err(|e| anyhow::anyhow!("{}: {e}", metadata.display()))?
            };
            let text = if json {
                serde_json::to_string_pretty(&d)? + "\n"
            } else {
                d.to_string()
            };
            match output {
                Some(p) => {
                    std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?
                }
                None => print!("{text}"),
            }
        }
        PoolCmd::Restore {
            input,
            metadata,
            yes,
        } => {
            if !yes {
                bail!(
                    "pool restore overwrites {}: add --yes to confirm",
                    metadata.display()
                );
            }
            let text = std::fs::read_to_string(&input)
                .with_context(|| format!("reading {}", input.display()))?;
            let d: thin::tools::Dump = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a JSON pool dump", input.display()))?;
            let dev = open_meta(&metadata, true)?;
            block("pool restore", thin::tools::restore(&d, &dev))?
                .map_err(|e| anyhow::anyhow!("{}: {e}", metadata.display()))?;
            println!(
                "restored {} device(s) into {}",
                d.devices.len(),
                metadata.display()
            );
        }
        PoolCmd::Repair { input, output, yes } => {
            if !yes {
                bail!(
                    "pool repair overwrites {}: add --yes to confirm",
                    output.display()
                );
            }
            let src = open_meta(&input, false)?;
            let dst = open_meta(&output, true)?;
            let r = block("pool repair", thin::tools::repair(&src, &dst))?
                .map_err(|e| anyhow::anyhow!("{} -> {}: {e}", input.display(), output.display()))?;
            println!(
                "recovered {} device(s), {} mapping(s) into {}",
                r.devices,
                r.mappings,
                output.display()
            );
            for p in &r.problems {
                println!("skipped: {p}");
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Table(TableCmd::Check { file, json }) => table_check(&file, json),
        Cmd::Serve(a) => serve(a),
        Cmd::Daemon(a) => daemon(a),
        Cmd::Dev(c) => dev(c),
        Cmd::Pool(c) => pool(c),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("volmgr: {e:#}");
            ExitCode::FAILURE
        }
    }
}
