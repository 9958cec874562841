//! Test server until the volmgr CLI serves tables: exports one file (through
//! `extents::FileExtent`), a RAM disk, or a device-mapper style table file (built-in
//! targets over files / block devices) as `/dev/ublkbN`.
//!
//! ```text
//! ublk-serve FILE|mem:SIZE|table:TABLEFILE [--queues N] [--depth N] [--id N] [--max-io BYTES] [--pin-queues] [--no-prefault]
//!            [--buffered] [--read-only] [--user-recovery] [--recover ID]
//! ```
//! Prints `/dev/ublkbN` on stdout once the device exists, serves until SIGTERM or SIGINT,
//! then stops and deletes the device and exits 0 (1 if stopping failed). `--recover ID`
//! re-attaches to `/dev/ublkbID` left by a killed `--user-recovery` server instead of adding.

use std::io::Write;
use std::sync::Arc;

use extents::{DirectMode, FileExtent, FileResolver, OpenOptions};
use tables::mem::MemDevice;
use tables::table::Table;
use tables::targets::builtin_registry;
use tables::units::parse_size;
use tables::DeviceRef;
use ublk_target::{UblkOptions, UblkServer};

fn usage() -> ! {
    eprintln!(
        "usage: ublk-serve FILE|mem:SIZE|table:TABLEFILE [--queues N] [--depth N] [--id N] [--max-io BYTES] [--pin-queues] [--no-prefault] \
         [--buffered] [--read-only] [--user-recovery] [--recover ID]"
    );
    std::process::exit(2)
}

fn num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> T {
    match v.as_deref().map(str::parse) {
        Some(Ok(n)) => n,
        _ => {
            eprintln!("ublk-serve: {flag} needs a number");
            usage()
        }
    }
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = std::env::args().skip(1);
    let mut target: Option<String> = None;
    let mut opts = UblkOptions::default();
    let mut open = OpenOptions::default();
    let mut recover: Option<u32> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--queues" => opts.queues = num(&a, args.next()),
            "--depth" => opts.depth = num(&a, args.next()),
            "--id" => opts.dev_id = Some(num(&a, args.next())),
            "--max-io" => opts.max_io_bytes = num(&a, args.next()),
            "--buffered" => open.direct = DirectMode::Never,
            "--read-only" => open.read_only = true,
            "--user-recovery" => opts.user_recovery = true,
            "--pin-queues" => opts.pin_queues = true,
            "--no-prefault" => opts.prefault_buffers = false,
            "--recover" => recover = Some(num(&a, args.next())),
            "-h" | "--help" => usage(),
            s if s.starts_with('-') => {
                eprintln!("ublk-serve: unknown option {s}");
                usage()
            }
            _ if target.is_none() => target = Some(a),
            _ => usage(),
        }
    }
    let Some(target) = target else { usage() };

    let dev: DeviceRef = if let Some(size) = target.strip_prefix("mem:") {
        match parse_size(size) {
            Ok(b) => Arc::new(MemDevice::new(target.clone(), b)),
            Err(e) => {
                eprintln!("ublk-serve: {target}: {e}");
                std::process::exit(2)
            }
        }
    } else if let Some(path) = target.strip_prefix("table:") {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("ublk-serve: {path}: {e}");
                std::process::exit(1)
            }
        };
        let reg = builtin_registry();
        let built = Table::parse(&text, &reg)
            .and_then(|t| t.build_named(path, &reg, &FileResolver::new(open)));
        match built {
            Ok(d) => d,
            Err(e) => {
                eprintln!("ublk-serve: {path}: {e}");
                std::process::exit(1)
            }
        }
    } else {
        match FileExtent::open(&target, open) {
            Ok(f) => {
                eprintln!("ublk-serve: {target}: {:?}", f.io_mode());
                Arc::new(f)
            }
            Err(e) => {
                eprintln!("ublk-serve: {e}");
                std::process::exit(1)
            }
        }
    };

    // Block the stop signals before any thread exists, so every thread inherits the mask and
    // only the sigwait below sees them.
    // SAFETY: plain libc signal-set manipulation on local storage.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };

    let started = match recover {
        Some(id) => UblkServer::recover(dev, id, &opts),
        None => UblkServer::start(dev, &opts),
    };
    let server = match started {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ublk-serve: {e}");
            std::process::exit(1)
        }
    };
    eprintln!(
        "ublk-serve: {}: data path: {}",
        server.bdev_path(),
        if server.zero_copy() {
            "zero copy"
        } else {
            "copy"
        }
    );
    println!("{}", server.bdev_path());
    let _ = std::io::stdout().flush();

    let mut sig: libc::c_int = 0;
    // SAFETY: `set` is initialised above; sigwait writes the signal number to `sig`.
    unsafe { libc::sigwait(&set, &mut sig) };
    eprintln!("ublk-serve: signal {sig}, stopping {}", server.bdev_path());
    match server.stop() {
        Ok(()) => eprintln!("ublk-serve: stopped"),
        Err(e) => {
            eprintln!("ublk-serve: stop: {e}");
            std::process::exit(1)
        }
    }
}
