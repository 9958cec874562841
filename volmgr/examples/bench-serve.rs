//! Benchmark server for the VM benchmarks in `benches/vm-*.sh`: builds a chain of named
//! tables (later tables may name earlier devices, as the daemon's `/dev/volmgr/NAME`), sends
//! pool messages, and serves the last device as `/dev/ublkbN`.
//!
//! ```text
//! bench-serve [--queues N] [--depth N] [--pin-queues] [--no-prefault] NAME=TABLEFILE [--msg NAME WORDS]... [NAME=TABLEFILE]...
//! ```
//! Example (a thin volume):
//! `bench-serve pool=pool.table --msg pool "create_thin 0" thin0=thin.table` where
//! `thin.table` says `0 N thin pool 0`.
//!
//! Why not the daemon: `volmgr::registry()` does not register the thin targets yet, and this
//! keeps the benchmark independent of the control protocol. The registry here is the
//! product's plus `thin`. Prints the `/dev/ublkbN` path on stdout, serves until SIGTERM or
//! SIGINT, then flushes, stops and exits 0.

use std::collections::HashMap;
use std::io::Write;
use std::process::ExitCode;

use tables::table::Table;
use tables::DeviceRef;
use ublk_target::{UblkOptions, UblkServer};

fn run() -> Result<(), String> {
    ublk_target::signals::block_termination_signals().map_err(|e| format!("signals: {e}"))?;
    let mut reg = volmgr::registry();
    thin::register(&mut reg);
    let files = extents::FileResolver::default();
    let mut opts = UblkOptions::default();
    let mut named: HashMap<String, DeviceRef> = HashMap::new();
    let mut last: Option<DeviceRef> = None;
    let mut args = std::env::args().skip(1);
    let num = |flag: &str, v: Option<String>| -> Result<u16, String> {
        v.and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{flag} needs a number"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--queues" => opts.queues = num(&a, args.next())?,
            "--depth" => opts.depth = num(&a, args.next())?,
            "--pin-queues" => opts.pin_queues = true,
            "--no-prefault" => opts.prefault_buffers = false,
            "--msg" => {
                let name = args.next().ok_or("--msg needs NAME WORDS")?;
                let words: Vec<String> = args
                    .next()
                    .ok_or("--msg needs NAME WORDS")?
                    .split_whitespace()
                    .map(str::to_string)
                    .collect();
                let dev = named.get(&name).ok_or(format!("--msg: no device {name}"))?;
                let reply = iort::block_on(dev.message(&words))
                    .map_err(|e| format!("runtime: {e}"))?
                    .map_err(|e| format!("message {name} {words:?}: {e}"))?;
                if !reply.is_empty() {
                    eprintln!("bench-serve: {name}: {reply}");
                }
            }
            _ => {
                let (name, file) = a
                    .split_once('=')
                    .ok_or(format!("'{a}' is not NAME=TABLEFILE"))?;
                let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
                let t = Table::parse(&text, &reg).map_err(|e| format!("{file}: {e}"))?;
                let resolver = |dev: &str| -> Result<DeviceRef, String> {
                    match named.get(dev) {
                        Some(d) => Ok(d.clone()),
                        None => tables::registry::Resolver::open(&files, dev),
                    }
                };
                let dev = t
                    .build_named(name, &reg, &resolver)
                    .map_err(|e| format!("{file}: {e}"))?;
                named.insert(name.to_string(), dev.clone());
                last = Some(dev);
            }
        }
    }
    let dev = last.ok_or("no table given")?;
    let server = UblkServer::start(dev.clone(), &opts).map_err(|e| e.to_string())?;
    println!("{}", server.bdev_path());
    let _ = std::io::stdout().flush();
    let sig = ublk_target::signals::wait_termination_signal();
    eprintln!("bench-serve: {sig}: stopping {}", server.bdev_path());
    eprintln!("bench-serve: status: {}", dev.status());
    server.stop().map_err(|e| format!("stop: {e}"))?;
    drop(named);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench-serve: {e}");
            ExitCode::FAILURE
        }
    }
}
