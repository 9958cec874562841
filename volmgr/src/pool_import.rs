//! `volmgr pool import`: an image file (raw, or qcow2 through `qemu-img`) becomes a new thin
//! volume of a live pool, written through the daemon so a dedup pool shares its blocks with
//! everything already there. All-zero 4 KiB pieces are not written (a new thin volume reads
//! zeroes there already).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tables::{Bytes, WriteFlags};
use ublk_target::control::Request;

use crate::client::{call, expect_text, StateDir};
use crate::pool_dedup::data_used;

/// The granularity zero pieces are skipped at (a dedup pool's block).
const PIECE: usize = 4096;
/// Bytes read from the image per batch of writes.
const CHUNK: usize = 4 << 20;
/// Longest single write.
const MAX_WRITE: usize = 1 << 20;

/// What an import did (`--json`).
#[derive(Debug, Default, serde::Serialize)]
pub struct ImportReport {
    /// The pool's device name.
    pub pool: String,
    /// The new thin volume.
    pub thin_id: u64,
    /// The image file.
    pub file: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Virtual size of the image (bytes); the volume has it rounded up to 512.
    pub bytes: u64,
    /// 4 KiB pieces written.
    pub written_pieces: u64,
    /// All-zero 4 KiB pieces skipped.
    pub zero_pieces: u64,
    /// Data blocks in use before and after.
    pub data_used_before: u64,
    /// See `data_used_before`.
    pub data_used_after: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Whether `file` starts with qcow2's magic (`QFI\xfb`).
pub fn is_qcow2(file: &Path) -> Result<bool> {
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let mut n = 0;
    while n < magic.len() {
        let r = f
            .read(&mut magic[n..])
            .with_context(|| format!("reading {}", file.display()))?;
        if r == 0 {
            return Ok(false);
        }
        n += r;
    }
    Ok(&magic == b"QFI\xfb")
}

/// The runs of non-zero `PIECE`s of `buf` (offsets within it, lengths up to `MAX_WRITE`), and
/// how many pieces were zero. A short last piece counts as a piece.
pub fn nonzero_runs(buf: &[u8]) -> (Vec<(usize, usize)>, u64) {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut zeros = 0u64;
    for (i, p) in buf.chunks(PIECE).enumerate() {
        if p.iter().all(|&b| b == 0) {
            zeros += 1;
            continue;
        }
        let off = i * PIECE;
        match runs.last_mut() {
            Some((o, l)) if *o + *l == off && *l + p.len() <= MAX_WRITE => *l += p.len(),
            _ => runs.push((off, p.len())),
        }
    }
    (runs, zeros)
}

/// A temporary raw copy of a qcow2 image; deleted on drop.
struct TempRaw(PathBuf);

impl Drop for TempRaw {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Converts a qcow2 image to a sparse raw file in `$TMPDIR` with `qemu-img convert`.
fn qcow2_to_raw(file: &Path) -> Result<TempRaw> {
    let tmp = TempRaw(std::env::temp_dir().join(format!(
        "volmgr-import-{}-{}.raw",
        std::process::id(),
        file.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    )));
    let out = Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(file)
        .arg(&tmp.0)
        .output()
        .with_context(|| format!("{}: running qemu-img (qemu-utils)", file.display()))?;
    if !out.status.success() {
        bail!(
            "{}: qemu-img convert failed: {}",
            file.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(tmp)
}

/// The temporary NBD export of the new volume in the daemon; removed on drop.
struct TempDevice<'a> {
    sd: &'a StateDir,
    name: String,
}

impl Drop for TempDevice<'_> {
    fn drop(&mut self) {
        let req = Request::Remove {
            name: self.name.clone(),
            force: true,
        };
        if let Err(e) = call(self.sd, req).and_then(expect_text) {
            eprintln!("removing the import device {}: {e:#}", self.name);
        }
    }
}

/// A free TCP port on 127.0.0.1 (the daemon binds it right after: a small race).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.port())
}

/// Imports `file` into `pool` as the new thin volume `thin_id`.
pub fn import(sd: &StateDir, pool: &str, thin_id: u64, file: &Path) -> Result<ImportReport> {
    let t0 = Instant::now();
    let qcow2 = is_qcow2(file)?;
    let tmp = if qcow2 {
        Some(qcow2_to_raw(file)?)
    } else {
        None
    };
    let raw = tmp.as_ref().map_or(file, |t| t.0.as_path());
    let bytes = std::fs::metadata(raw)
        .with_context(|| format!("{}: size", raw.display()))?
        .len();
    if bytes == 0 {
        bail!("{}: the image is empty", file.display());
    }
    let sectors = bytes.div_ceil(512);
    let mut r = ImportReport {
        pool: pool.to_string(),
        thin_id,
        file: file.to_path_buf(),
        format: if qcow2 { "qcow2" } else { "raw" }.into(),
        bytes,
        data_used_before: data_used(sd, pool)?,
        ..ImportReport::default()
    };
    expect_text(call(
        sd,
        Request::Message {
            name: pool.to_string(),
            args: vec!["create_thin".into(), thin_id.to_string()],
        },
    )?)
    .with_context(|| format!("{pool}: create_thin {thin_id}"))?;
    let left = |e: anyhow::Error| {
        e.context(format!(
            "{pool}: thin {thin_id} was created and is partly written \
             (`volmgr dev message {pool} delete {thin_id}` removes it)"
        ))
    };
    let name = format!("import-{pool}-{thin_id}");
    let port = free_port()?;
    expect_text(call(
        sd,
        Request::Create {
            name: name.clone(),
            table: format!("0 {sectors} thin /dev/volmgr/{pool} {thin_id}\n"),
            ublk_id: None,
            nbd: Some(format!("127.0.0.1:{port}")),
            nbd_limits: Default::default(),
            internal: false,
            export: None,
        },
    )?)
    .with_context(|| format!("{pool}: exporting thin {thin_id} as {name}"))
    .map_err(left)?;
    let dev_guard = TempDevice { sd, name };
    let uri = format!("nbd://127.0.0.1:{port}/{}", dev_guard.name);
    let dev = extents::net::open(&uri)
        .with_context(|| format!("{pool}: connecting to {uri}"))
        .map_err(left)?
        .device();
    copy_nonzero(raw, &dev, &mut r)
        .with_context(|| format!("importing {} into {pool} thin {thin_id}", file.display()))
        .map_err(left)?;
    drop(dev);
    drop(dev_guard);
    r.data_used_after = data_used(sd, pool)?;
    r.seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}

/// Writes the non-zero pieces of `raw` to `dev` at the same offsets, then flushes.
fn copy_nonzero(raw: &Path, dev: &tables::DeviceRef, r: &mut ImportReport) -> Result<()> {
    let mut f = std::fs::File::open(raw).with_context(|| format!("opening {}", raw.display()))?;
    let bar =
        crate::progress::bar("{msg} [{bar:30}] {bytes}/{total_bytes} {elapsed_precise} eta {eta}");
    if let Some(b) = &bar {
        b.set_length(r.bytes);
        b.set_message(format!("thin {}", r.thin_id));
    }
    let mut last_line = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    let mut pos = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            let got = f
                .read(&mut buf[n..])
                .with_context(|| format!("reading {} at byte {}", raw.display(), pos + n as u64))?;
            if got == 0 {
                break;
            }
            n += got;
        }
        if n == 0 {
            break;
        }
        // The volume is the image rounded up to a sector: pad a short tail with zeroes
        // (`buf` past `n` may still hold the previous chunk).
        let end = n.next_multiple_of(512);
        buf[n..end].fill(0);
        let (runs, zeros) = nonzero_runs(&buf[..end]);
        r.zero_pieces += zeros;
        let futs = runs.iter().map(|&(o, l)| {
            // SAFETY: `buf` is alive and untouched until every write of this batch is
            // awaited below.
            unsafe { dev.write(Bytes(pos + o as u64), &buf[o..o + l], WriteFlags::default()) }
        });
        let res =
            iort::block_on(futures::future::join_all(futs)).context("starting the I/O runtime")?;
        for (x, &(o, l)) in res.into_iter().zip(&runs) {
            x.with_context(|| format!("writing {l} bytes at byte {}", pos + o as u64))?;
            r.written_pieces += (l as u64).div_ceil(PIECE as u64);
        }
        pos += n as u64;
        match &bar {
            Some(b) => b.set_position(pos),
            None if last_line.elapsed() >= Duration::from_secs(5) => {
                eprintln!("thin {}: {pos}/{} bytes", r.thin_id, r.bytes);
                last_line = Instant::now();
            }
            None => {}
        }
    }
    iort::block_on(dev.flush())
        .context("starting the I/O runtime")?
        .context("flushing")?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_pieces_are_skipped_and_runs_are_joined_up_to_the_write_limit() {
        let mut b = vec![0u8; 10 * PIECE + 100];
        b[PIECE] = 1; // piece 1
        b[2 * PIECE + 5] = 1; // piece 2: joins piece 1
        b[5 * PIECE] = 1; // piece 5
        b[10 * PIECE + 99] = 1; // the short tail
        let (runs, zeros) = nonzero_runs(&b);
        assert_eq!(
            runs,
            vec![(PIECE, 2 * PIECE), (5 * PIECE, PIECE), (10 * PIECE, 100)]
        );
        assert_eq!(zeros, 7);
        let full = vec![1u8; 3 * MAX_WRITE];
        let (runs, zeros) = nonzero_runs(&full);
        assert_eq!(zeros, 0);
        assert_eq!(
            runs,
            vec![
                (0, MAX_WRITE),
                (MAX_WRITE, MAX_WRITE),
                (2 * MAX_WRITE, MAX_WRITE)
            ]
        );
    }

    #[test]
    fn qcow2_is_told_by_its_magic() {
        let d = tempfile::tempdir().unwrap();
        let q = d.path().join("q");
        std::fs::write(&q, b"QFI\xfb\0\0\0\x03rest").unwrap();
        let raw = d.path().join("r");
        std::fs::write(&raw, b"QFI").unwrap();
        assert!(is_qcow2(&q).unwrap());
        assert!(!is_qcow2(&raw).unwrap());
        assert!(is_qcow2(&d.path().join("none")).is_err());
    }
}
