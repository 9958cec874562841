//! `volmgr pool`: thin-pool metadata tools and online resize.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use tables::table::Table;
use tables::DeviceRef;
use ublk_target::control::Request;

use crate::client::{call, expect_text, StateDir};

#[derive(Subcommand)]
pub enum PoolCmd {
    /// Verify every metadata structure and recount every reference (as thin_check).
    Check {
        /// Metadata device or file.
        metadata: PathBuf,
        /// JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Write the metadata as a readable dump: text, JSON, or thin_dump's XML.
    ///
    /// `--format xml` writes thin-provisioning-tools' format, as `thin_dump` writes it:
    /// `thin_restore -i FILE -o METADATA` turns it into metadata kernel dm-thin opens over the
    /// same data device (data block N is at byte N * block size on both sides). Our
    /// metadata keeps no uuid, times, flags or per-device transaction ids: they are written
    /// as 0 (uuid empty), as thin_dump writes them for a pool that never had them. JSON and
    /// XML are what `pool restore` reads; the text form is for people.
    Dump {
        /// Metadata device or file.
        metadata: PathBuf,
        /// Output format.
        #[arg(long, value_enum, default_value_t = DumpFormat::Text)]
        format: DumpFormat,
        /// Same as `--format json`.
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// Dump the held metadata snapshot (reserve_metadata_snap) instead of the live root.
        #[arg(long)]
        metadata_snap: bool,
        /// Write to this file instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Write metadata rebuilt from a dump onto a metadata device (overwrites it).
    ///
    /// Reads JSON (`pool dump --format json`) or thin_dump's XML (`pool dump --format xml`,
    /// or `thin_dump METADATA` of kernel dm-thin metadata), told apart by the first
    /// character (`{` or `<`) unless `--format` says. From XML the superblock's transaction
    /// id, block size and data block count, every device and every mapping are kept; uuid,
    /// times, flags, per-device transaction ids and a held metadata snapshot are dropped.
    /// Sharing between snapshots is not recorded in a dump: each mapping becomes its own
    /// reference to its data block (a block two snapshots share gets a reference count of
    /// 2), and the data device is used as it is. Malformed or inconsistent XML (unknown elements or
    /// attributes, overlapping mappings, blocks beyond the pool, a device id twice) is
    /// refused naming the line, element and attribute, before the metadata device is touched.
    Restore {
        /// Dump to read (JSON or XML).
        #[arg(short, long)]
        input: PathBuf,
        /// Format of the input (default: from its first character).
        #[arg(long, value_enum)]
        format: Option<RestoreFormat>,
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
    /// Hash and share the blocks of a live dedup pool that were written before dedup was
    /// on (a plain pool reloaded with the `dedup` feature): identical blocks end up stored once.
    ///
    /// Drives the pool's `dedup_scan N` message step by step until no unhashed block is
    /// left (or a whole pass finds none it can hash). It backs off for `--pause-ms` after any
    /// step during which clients wrote to the pool, and `--rate` caps the blocks hashed per
    /// second. Resumable: stop it (Ctrl-C) at any time and run it again; the unhashed blocks
    /// are the work left, and what is already hashed is skipped quickly.
    DedupScan {
        /// The pool's device name in the daemon.
        name: String,
        /// Mappings per step (one control request each).
        #[arg(long, default_value_t = 4096)]
        step: u64,
        /// Most blocks hashed per second.
        #[arg(long)]
        rate: Option<u64>,
        /// Pause after a step during which clients wrote (milliseconds).
        #[arg(long, default_value_t = 200)]
        pause_ms: u64,
        /// JSON report at the end.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        sd: StateDir,
    },
    /// Import an image file into a live pool as a new thin volume: creates thin N
    /// (`create_thin N`) and writes the image's blocks into it through the daemon, so a dedup
    /// pool stores only the blocks it does not hold yet.
    ///
    /// A qcow2 image (told by its magic) is converted with `qemu-img convert -O raw` to a
    /// temporary file in $TMPDIR first; anything else is read as raw. All-zero 4 KiB pieces
    /// are not written (the new volume reads zeroes there). The volume's size is the image's,
    /// rounded up to 512 bytes. The data goes through a temporary NBD export of the volume on
    /// 127.0.0.1 (device `import-POOL-N`), removed at the end.
    Import {
        /// The pool's device name in the daemon.
        name: String,
        /// Thin device id to create (must not exist).
        #[arg(long)]
        thin_id: u64,
        /// Image file (raw or qcow2).
        file: PathBuf,
        /// JSON report at the end.
        #[arg(long)]
        json: bool,
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

/// Formats `pool dump` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DumpFormat {
    /// For people (one line per run of mappings).
    Text,
    /// Our JSON dump.
    Json,
    /// thin-provisioning-tools' XML (thin_dump, thin_restore).
    Xml,
}

/// Formats `pool restore` reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreFormat {
    /// Our JSON dump.
    Json,
    /// thin-provisioning-tools' XML.
    Xml,
}

/// Reads a dump in `format`, or in the format its first character says (`<` XML, else JSON).
fn parse_dump(
    input: &Path,
    text: &str,
    format: Option<RestoreFormat>,
) -> Result<thin::tools::Dump> {
    let format = format.unwrap_or_else(|| {
        let start = text.trim_start_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
        if start.starts_with('<') {
            RestoreFormat::Xml
        } else {
            RestoreFormat::Json
        }
    });
    Ok(match format {
        RestoreFormat::Json => serde_json::from_str(text)
            .with_context(|| format!("{}: not a JSON pool dump", input.display()))?,
        RestoreFormat::Xml => thin::xml::from_xml(text)
            .with_context(|| format!("{}: not a usable thin_dump XML file", input.display()))?,
    })
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
        .with_context(|| format!("pool {pool}: {what} device {dev}"))?;
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
            .with_context(|| format!("'{s}'"))
    };
    let text = expect_text(call(sd, Request::Table { name: name.into() })?)?;
    let table = Table::parse(&text, &volmgr::registry())
        .with_context(|| format!("{name}: its table does not parse"))?;
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

/// `pool check`'s text report: the totals, a dedup pool's hash record recount, the errors
/// and the findings that are not errors.
fn check_text(metadata: &Path, r: &thin::tools::CheckReport) -> String {
    let mut t = format!(
        "{}: transaction {} generation {}; {} thin device(s), {} mapped block(s); data {}/{} blocks, metadata {}/{} blocks\n",
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
    if r.dedup {
        t += &format!(
            "dedup: {} hash record(s), {} stale, {} duplicate hash(es)\n",
            r.hash_records, r.stale_hash_records, r.duplicate_hashes
        );
    }
    for e in &r.errors {
        t += &format!("error: {e}\n");
    }
    for i in &r.info {
        t += &format!("info: {i}\n");
    }
    t
}

/// Runs a `pool` verb.
pub fn run(cmd: PoolCmd) -> Result<()> {
    match cmd {
        PoolCmd::Resize {
            name,
            data_size,
            metadata_size,
            sd,
        } => pool_resize(&name, data_size, metadata_size, &sd)?,
        PoolCmd::Import {
            name,
            thin_id,
            file,
            json,
            sd,
        } => {
            let r = crate::pool_import::import(&sd, &name, thin_id, &file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{name}: thin {thin_id} from {} ({}, {} bytes): {} 4 KiB pieces written, \
                     {} zero pieces skipped, {:.1} s; data blocks used {} -> {}",
                    file.display(),
                    r.format,
                    r.bytes,
                    r.written_pieces,
                    r.zero_pieces,
                    r.seconds,
                    r.data_used_before,
                    r.data_used_after
                );
            }
        }
        PoolCmd::DedupScan {
            name,
            step,
            rate,
            pause_ms,
            json,
            sd,
        } => {
            let o = crate::pool_dedup::ScanOpts {
                step,
                rate,
                pause: std::time::Duration::from_millis(pause_ms),
            };
            let r = crate::pool_dedup::dedup_scan(&sd, &name, &o)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!(
                    "{name}: visited {} hashed {} shared {} recorded {} in {} pass(es), {:.1} s; \
                     data blocks used {} -> {}; {} unhashed left",
                    r.visited,
                    r.hashed,
                    r.shared,
                    r.recorded,
                    r.passes,
                    r.seconds,
                    r.data_used_before,
                    r.data_used_after,
                    r.unhashed_left
                );
            }
        }
        PoolCmd::Check { metadata, json } => {
            let dev = open_meta(&metadata, false)?;
            let r = block("pool check", thin::tools::check(&dev))?
                .with_context(|| metadata.display().to_string())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", check_text(&metadata, &r));
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
            format,
            json,
            metadata_snap,
            output,
        } => {
            let dev = open_meta(&metadata, false)?;
            let d = if metadata_snap {
                block("pool dump", thin::tools::dump_metadata_snap(&dev))?
                    .with_context(|| metadata.display().to_string())?
                    .with_context(|| {
                        format!("{}: no metadata snapshot is held", metadata.display())
                    })?
            } else {
                block("pool dump", thin::tools::dump(&dev))?
                    .with_context(|| metadata.display().to_string())?
            };
            let format = if json { DumpFormat::Json } else { format };
            let text = match format {
                DumpFormat::Json => serde_json::to_string_pretty(&d)? + "\n",
                DumpFormat::Xml => thin::xml::to_xml(&d),
                DumpFormat::Text => d.to_string(),
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
            format,
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
            let d = parse_dump(&input, &text, format)?;
            let dev = open_meta(&metadata, true)?;
            block("pool restore", thin::tools::restore(&d, &dev))?
                .with_context(|| metadata.display().to_string())?;
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
                .with_context(|| format!("{} -> {}", input.display(), output.display()))?;
            println!(
                "recovered {} device(s), {} mapping(s) into {}",
                r.devices,
                r.mappings,
                output.display()
            );
            for p in &r.problems {
                println!("skipped: {p}");
            }
            // Exit non-zero when anything was left behind, so scripts do not mistake a lossy
            // repair for a clean one.
            if r.lost_anything() {
                bail!(
                    "{}: repair lost {} device(s) and at least {} mapping(s) under {} \
                     unreadable part(s) (the new metadata in {} is consistent)",
                    input.display(),
                    r.devices_lost,
                    r.mappings_lost,
                    r.unreadable_subtrees,
                    output.display()
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_text_shows_the_dedup_recount_only_for_dedup_pools() {
        let mut r = thin::tools::CheckReport {
            clean: true,
            devices: 2,
            hash_records: 10,
            stale_hash_records: 1,
            duplicate_hashes: 2,
            info: vec!["1 stale hash record(s)".into()],
            ..Default::default()
        };
        let t = check_text(Path::new("m"), &r);
        assert!(!t.contains("dedup:"), "{t}");
        assert!(t.contains("\ninfo: 1 stale hash record(s)\n"), "{t}");
        r.dedup = true;
        let t = check_text(Path::new("m"), &r);
        assert!(
            t.contains("\ndedup: 10 hash record(s), 1 stale, 2 duplicate hash(es)\n"),
            "{t}"
        );
    }
}
