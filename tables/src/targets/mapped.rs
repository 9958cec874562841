//! The segment map: a whole table as one device. Each request goes to the segments it spans,
//! split at segment boundaries; the pieces run concurrently and errors say which table line
//! and offset failed.

use crate::io::{
    check_range, copy_mapped_pieces, join_pieces, join_served, ready, BlockDevice, DeviceRef,
    FixedBuf, IoError, IoFuture, Limits, MappedCopy, Served, WriteFlags,
};
use crate::units::{Bytes, Sectors};

/// One built segment.
pub struct MappedSegment {
    /// Table line it came from (0 if built programmatically).
    pub line: usize,
    /// First sector in the mapped device.
    pub start: Sectors,
    /// Length in sectors.
    pub len: Sectors,
    /// Target type name (for status lines).
    pub target: String,
    /// The segment's device; its byte 0 is the segment's first sector.
    pub dev: DeviceRef,
}

impl MappedSegment {
    fn start_b(&self) -> u64 {
        self.start.bytes().0
    }
    fn end_b(&self) -> u64 {
        self.start.bytes().0 + self.len.bytes().0
    }
}

/// A table as a device.
pub struct Mapped {
    name: String,
    segs: Vec<MappedSegment>,
    size: Bytes,
}

impl Mapped {
    /// Builds the map. Segments must be ascending and contiguous from sector 0, and each
    /// device must hold its segment; the error carries the offending line.
    pub fn new(
        name: impl Into<String>,
        segs: Vec<MappedSegment>,
    ) -> Result<Mapped, (usize, String)> {
        let name = name.into();
        if segs.is_empty() {
            return Err((0, format!("{name}: a table needs at least one segment")));
        }
        let mut next = Sectors(0);
        for s in &segs {
            if s.start != next {
                return Err((
                    s.line,
                    format!(
                        "segment starts at sector {}, expected {} (segments must be contiguous and ascending)",
                        s.start, next
                    ),
                ));
            }
            if s.len.0 == 0 {
                return Err((s.line, "zero-length segment".into()));
            }
            next = match s.start.checked_add(s.len) {
                Some(e) if e.0.checked_mul(512).is_some() => e,
                _ => return Err((s.line, "segment end overflows".into())),
            };
            if s.dev.size() < s.len.bytes() {
                return Err((
                    s.line,
                    format!(
                        "{} target device {} is {} bytes, smaller than its segment of {} sectors",
                        s.target,
                        s.dev.name(),
                        s.dev.size().0,
                        s.len
                    ),
                ));
            }
        }
        Ok(Mapped {
            name,
            segs,
            size: next.bytes(),
        })
    }

    /// The segments.
    pub fn segments(&self) -> &[MappedSegment] {
        &self.segs
    }

    /// Splits `[offset, offset+len)` at segment boundaries: (segment index, offset within
    /// the segment, piece length). The range must already be checked.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(usize, u64, u64)> {
        let mut out = Vec::new();
        let end = offset + len;
        let mut pos = offset;
        let mut i = self.segs.partition_point(|s| s.end_b() <= pos);
        while pos < end && i < self.segs.len() {
            let s = &self.segs[i];
            let n = (s.end_b() - pos).min(end - pos);
            out.push((i, pos - s.start_b(), n));
            pos += n;
            i += 1;
        }
        out
    }

    fn ctx(&self, i: usize, within: u64, e: IoError) -> IoError {
        let s = &self.segs[i];
        e.context(format_args!(
            "{}: line {} ({} segment at sector {}), byte {} of the device",
            self.name,
            s.line,
            s.target,
            s.start,
            s.start_b() + within
        ))
    }

    fn ranged<'a>(
        &'a self,
        offset: Bytes,
        len: Bytes,
        op: impl Fn(&'a DeviceRef, Bytes, Bytes) -> IoFuture<'a>,
    ) -> IoFuture<'a> {
        if let Err(e) = check_range(&self.name, self.size, offset, len) {
            return ready(Err(e));
        }
        let futs: Vec<IoFuture<'a>> = self
            .pieces(offset.0, len.0)
            .into_iter()
            .map(|(i, within, n)| {
                let f = op(&self.segs[i].dev, Bytes(within), Bytes(n));
                Box::pin(async move { f.await.map_err(|e| self.ctx(i, within, e)) }) as IoFuture<'a>
            })
            .collect();
        join_pieces(futs)
    }
}

impl Mapped {
    /// A fixed-buffer read or write split at segment boundaries.
    fn fixed<'a>(
        &'a self,
        offset: Bytes,
        buf: FixedBuf,
        op: impl Fn(&'a DeviceRef, Bytes, FixedBuf) -> IoFuture<'a, Served>,
    ) -> IoFuture<'a, Served> {
        if let Err(e) = check_range(&self.name, self.size, offset, Bytes(buf.len as u64)) {
            return ready(Err(e));
        }
        let mut at = 0usize;
        let futs = self
            .pieces(offset.0, buf.len as u64)
            .into_iter()
            .map(|(i, within, n)| {
                let f = op(&self.segs[i].dev, Bytes(within), buf.slice(at, n as usize));
                at += n as usize;
                Box::pin(async move { f.await.map_err(|e| self.ctx(i, within, e)) })
                    as IoFuture<'a, Served>
            })
            .collect();
        join_served(futs)
    }
}

impl BlockDevice for Mapped {
    fn name(&self) -> String {
        self.name.clone()
    }
    fn size(&self) -> Bytes {
        self.size
    }
    fn limits(&self) -> Limits {
        let mut it = self.segs.iter();
        let Some(first) = it.next() else {
            return Limits::default();
        };
        it.fold(first.dev.limits(), |l, s| l.stack(&s.dev.limits()))
    }
    unsafe fn read<'a>(&'a self, offset: Bytes, buf: &'a mut [u8]) -> IoFuture<'a> {
        if let Err(e) = check_range(&self.name, self.size, offset, Bytes(buf.len() as u64)) {
            return ready(Err(e));
        }
        let mut futs: Vec<IoFuture<'a>> = Vec::new();
        let mut rest: &'a mut [u8] = buf;
        for (i, within, n) in self.pieces(offset.0, rest.len() as u64) {
            let (piece, tail) = std::mem::take(&mut rest).split_at_mut(n as usize);
            rest = tail;
            let f = self.segs[i].dev.read(Bytes(within), piece);
            futs.push(Box::pin(async move {
                f.await.map_err(|e| self.ctx(i, within, e))
            }));
        }
        join_pieces(futs)
    }
    unsafe fn write<'a>(&'a self, offset: Bytes, buf: &'a [u8], flags: WriteFlags) -> IoFuture<'a> {
        if let Err(e) = check_range(&self.name, self.size, offset, Bytes(buf.len() as u64)) {
            return ready(Err(e));
        }
        let mut futs: Vec<IoFuture<'a>> = Vec::new();
        let mut rest: &'a [u8] = buf;
        for (i, within, n) in self.pieces(offset.0, rest.len() as u64) {
            let (piece, tail) = rest.split_at(n as usize);
            rest = tail;
            let f = self.segs[i].dev.write(Bytes(within), piece, flags);
            futs.push(Box::pin(async move {
                f.await.map_err(|e| self.ctx(i, within, e))
            }));
        }
        join_pieces(futs)
    }
    fn read_fixed(&self, offset: Bytes, buf: FixedBuf) -> IoFuture<'_, Served> {
        self.fixed(offset, buf, |d, o, b| d.read_fixed(o, b))
    }
    fn copy_mapped<'a>(
        &'a self,
        offset: Bytes,
        len: usize,
        write: Option<WriteFlags>,
        copy: MappedCopy<'a>,
    ) -> IoFuture<'a, Served> {
        Box::pin(async move {
            check_range(&self.name, self.size, offset, Bytes(len as u64))?;
            let pieces = self
                .pieces(offset.0, len as u64)
                .into_iter()
                .map(|(i, within, n)| (i, &self.segs[i].dev, Bytes(within), n as usize))
                .collect();
            copy_mapped_pieces(pieces, write, copy, |i, o, e| self.ctx(i, o.0, e)).await
        })
    }
    fn write_fixed(&self, offset: Bytes, buf: FixedBuf, flags: WriteFlags) -> IoFuture<'_, Served> {
        self.fixed(offset, buf, move |d, o, b| d.write_fixed(o, b, flags))
    }
    fn flush(&self) -> IoFuture<'_> {
        let futs: Vec<IoFuture<'_>> = self
            .segs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let f = s.dev.flush();
                Box::pin(async move { f.await.map_err(|e| self.ctx(i, 0, e)) }) as IoFuture<'_>
            })
            .collect();
        join_pieces(futs)
    }
    fn discard(&self, offset: Bytes, len: Bytes) -> IoFuture<'_> {
        self.ranged(offset, len, |d, o, l| d.discard(o, l))
    }
    fn write_zeroes(&self, offset: Bytes, len: Bytes, flags: WriteFlags) -> IoFuture<'_> {
        self.ranged(offset, len, move |d, o, l| d.write_zeroes(o, l, flags))
    }
    /// One dm-style status line per segment: `start length target status`.
    fn status(&self) -> String {
        self.segs
            .iter()
            .map(|s| {
                let st = s.dev.status();
                if st.is_empty() {
                    format!("{} {} {}", s.start, s.len, s.target)
                } else {
                    format!("{} {} {} {}", s.start, s.len, s.target, st)
                }
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
    /// `dmsetup message` semantics with sector 0: goes to the segment mapping sector 0.
    fn message<'a>(&'a self, args: &'a [String]) -> IoFuture<'a, String> {
        match self.segs.first() {
            Some(s) => s.dev.message(args),
            None => ready(Err(IoError::invalid(format!("{}: no segments", self.name)))),
        }
    }
}
