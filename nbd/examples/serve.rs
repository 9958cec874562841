//! Serves a RAM disk or a regular file over NBD until stdin closes, for manual checks and
//! benchmarks against other servers (nbdkit, qemu-nbd):
//!
//! `serve ADDR mem|null SIZE_MIB [THREADS]` or `serve ADDR file PATH [THREADS]`
//!
//! The export is named `disk`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tables::io::{ready, BlockDevice, IoError, IoFuture, WriteFlags};
use tables::mem::MemDevice;
use tables::units::Bytes;
use tables::DeviceRef;

/// A regular file read and written through the thread's io_uring (page cache, no O_DIRECT).
struct FileDevice {
    path: String,
    file: File,
    size: Bytes,
}

impl BlockDevice for FileDevice {
    fn name(&self) -> String {
        self.path.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        Box::pin(async move {
            let mut done = 0;
            while done < buf.len() {
                let off = offset.0 + done as u64;
                let n = iort::read_at(self.file.as_raw_fd(), &mut buf[done..], off).await?;
                if n == 0 {
                    return Err(IoError::eio(format!("{}: short read at {off}", self.path)));
                }
                done += n;
            }
            Ok(())
        })
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        let rwf = if flags.fua { libc::RWF_DSYNC } else { 0 };
        Box::pin(async move {
            let mut done = 0;
            while done < buf.len() {
                let off = offset.0 + done as u64;
                done += iort::write_at(self.file.as_raw_fd(), &buf[done..], off, rwf).await?;
            }
            Ok(())
        })
    }
    fn flush(&self) -> IoFuture<'_> {
        Box::pin(async move { Ok(iort::fsync(self.file.as_raw_fd(), true).await?) })
    }
    fn discard(&self, _offset: Bytes, _len: Bytes) -> IoFuture<'_> {
        ready(Ok(()))
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        Box::pin(tables::io::write_zeroes_by_writing(
            self, offset, len, flags,
        ))
    }
}

/// Reads return whatever the buffer held, writes vanish: measures the server alone
/// (compare with `nbdkit null`).
struct NullDevice(Bytes);

impl BlockDevice for NullDevice {
    fn name(&self) -> String {
        "null".into()
    }
    fn size(&self) -> Bytes {
        self.0
    }
    unsafe fn read<'a>(&'a self, _offset: Bytes, _buf: &'a mut [u8]) -> IoFuture<'a> {
        ready(Ok(()))
    }
    unsafe fn write<'a>(
        &'a self,
        _offset: Bytes,
        _buf: &'a [u8],
        _flags: WriteFlags,
    ) -> IoFuture<'a> {
        ready(Ok(()))
    }
    fn flush(&self) -> IoFuture<'_> {
        ready(Ok(()))
    }
    fn discard(&self, _offset: Bytes, _len: Bytes) -> IoFuture<'_> {
        ready(Ok(()))
    }
    fn write_zeroes(&self, _offset: Bytes, _len: Bytes, _flags: WriteFlags) -> IoFuture<'_> {
        ready(Ok(()))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err(
            "usage: serve ADDR mem|null SIZE_MIB [THREADS] | serve ADDR file PATH [THREADS]".into(),
        );
    }
    let threads: usize = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let dev: DeviceRef = match args[2].as_str() {
        "null" => Arc::new(NullDevice(Bytes(args[3].parse::<u64>()? << 20))),
        "mem" => Arc::new(MemDevice::new("ram0", Bytes(args[3].parse::<u64>()? << 20))),
        "file" => {
            let file = File::options().read(true).write(true).open(&args[3])?;
            let size = Bytes(file.metadata()?.len());
            Arc::new(FileDevice {
                path: args[3].clone(),
                file,
                size,
            })
        }
        other => return Err(format!("unknown backend '{other}'").into()),
    };
    let h = nbd::Server::builder()
        .export("disk", "", dev)
        .threads(threads)
        .build()?
        .serve_tcp(args[1].as_str())?;
    eprintln!(
        "serving nbd://{}/disk",
        h.local_addr().map(|a| a.to_string()).unwrap_or_default()
    );
    let mut line = String::new();
    while std::io::stdin().read_line(&mut line)? > 0 {
        line.clear();
    }
    h.shutdown()?;
    Ok(())
}
