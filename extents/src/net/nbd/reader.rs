//! A link's own thread: connects (and reconnects with backoff), then reads replies and hands
//! them to the requests waiting on the link. Anything the protocol does not allow (a bad
//! magic, a reply for a request never sent, a chunk past the request, an unknown chunk type)
//! drops the connection with the reason logged; the requests on it are sent again on the
//! next connection, so a garbage-talking server costs time, never wrong data.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nbd::proto::*;
use tables::IoError;

use super::handshake::{self, Connected};
use super::link::{cmd_name, Link, Wired};
use super::wire::*;
use crate::net::sock::Receiver;

/// Receive buffer: many small replies per `recv`, and the largest payload we take in one
/// piece (larger ones are copied through it in steps).
const RECV_BUF: usize = 256 * 1024;
/// Longest error message a server may send in an error chunk (the spec's string limit).
const MAX_ERROR_MSG: usize = 4096;

/// Runs the link until it is stopped. `first` is the connection `open` already made.
pub(crate) fn run(link: Arc<Link>, first: Option<Connected>) {
    let rt = match iort::Runtime::new(64) {
        Ok(rt) => rt,
        Err(e) => {
            link.connect_failed(&format!("cannot create an io_uring for the link: {e}"));
            return;
        }
    };
    rt.block_on(main_loop(&link, first));
}

async fn main_loop(link: &Link, mut next: Option<Connected>) {
    let mut backoff = Duration::from_millis(50);
    while !link.stopped() {
        let c = match next.take() {
            Some(c) => c,
            None => match handshake::connect(&link.uri) {
                Ok(c) => match compatible(link, &c) {
                    Ok(()) => c,
                    Err(why) => {
                        link.connect_failed(&why);
                        pause(link, &mut backoff).await;
                        continue;
                    }
                },
                Err(e) => {
                    link.connect_failed(&e.to_string());
                    pause(link, &mut backoff).await;
                    continue;
                }
            },
        };
        let fd = Arc::new(Wired {
            fd: c.fd,
            tls: c.tls.map(std::sync::Mutex::new),
        });
        let since = Instant::now();
        let gen = link.up(fd.clone());
        if link.stopped() {
            link.down(gen, "stopped");
            break;
        }
        // SAFETY: the reader future is awaited here to completion, never leaked.
        let why = unsafe { read_replies(link, &fd, gen) }.await;
        link.down(gen, &why);
        // A connection that broke at once (a server that answers garbage, or accepts and
        // closes) is retried with growing pauses, not in a storm.
        if since.elapsed() < Duration::from_secs(2) {
            pause(link, &mut backoff).await;
        } else {
            backoff = Duration::from_millis(50);
        }
    }
    link.goodbye();
}

/// Sleeps for the backoff (in small steps, so a stop is seen) and doubles it up to 2 s.
async fn pause(link: &Link, backoff: &mut Duration) {
    let until = Instant::now() + *backoff;
    while !link.stopped() && Instant::now() < until {
        iort::sleep(Duration::from_millis(20).min(*backoff)).await;
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(2));
}

/// A new connection must show the export the first one did.
fn compatible(link: &Link, c: &Connected) -> Result<(), String> {
    let (a, b) = (&link.info, &c.info);
    if a.size != b.size {
        return Err(format!(
            "the export is now {} bytes, it was {} bytes: not reconnecting to a different disk",
            b.size, a.size
        ));
    }
    let must_keep = TFLAG_READ_ONLY | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
    if (a.tflags ^ b.tflags) & must_keep != 0 || a.structured != b.structured {
        return Err(format!(
            "the export's flags changed ({:#x}, they were {:#x})",
            b.tflags, a.tflags
        ));
    }
    if (a.min_block, a.max_block) != (b.min_block, b.max_block) {
        return Err("the export's block sizes changed".into());
    }
    Ok(())
}

/// Reads replies until the connection breaks or misbehaves; returns why.
///
/// # Safety
/// Lends the receiver's buffer to the kernel: keep the
/// [lending contract](tables::io#the-lending-contract).
async unsafe fn read_replies(link: &Link, fd: &Arc<Wired>, gen: u64) -> String {
    let mut rx = Receiver::new(fd.clone(), RECV_BUF);
    loop {
        if link.stopped() {
            return "stopped".into();
        }
        // SAFETY: our caller keeps the lending contract for this future.
        let r = unsafe { one_reply(link, &mut rx) }.await;
        match r {
            Ok(()) => {}
            Err(Broken::Io(e)) => return format!("receive: {e}"),
            Err(Broken::Protocol(why)) => {
                link.kill(gen, &why);
                return why;
            }
        }
    }
}

enum Broken {
    Io(std::io::Error),
    Protocol(String),
}

impl From<std::io::Error> for Broken {
    fn from(e: std::io::Error) -> Broken {
        Broken::Io(e)
    }
}

fn garbage(msg: String) -> Broken {
    Broken::Protocol(format!("protocol violation by the server: {msg}"))
}

/// Reads one reply (simple) or one chunk (structured) and delivers it.
///
/// # Safety
/// As [`read_replies`].
async unsafe fn one_reply(link: &Link, rx: &mut Receiver) -> Result<(), Broken> {
    // SAFETY: our caller keeps the lending contract.
    let magic = be32(unsafe { rx.need(4) }.await?);
    let started = Instant::now();
    match magic {
        SIMPLE_REPLY_MAGIC => {
            // SAFETY: our caller keeps the lending contract.
            let h = unsafe { rx.need(REPLY_LEN) }.await?;
            let err = be32(&h[4..8]);
            let cookie = be64(&h[8..16]);
            rx.consume(REPLY_LEN);
            let (cmd, _off, len) = link
                .expected(cookie)
                .ok_or_else(|| garbage(format!("simple reply for cookie {cookie}, never sent")))?;
            if err != 0 {
                let e = server_error(link, cmd, _off, len, err, "");
                link.finish(cookie, Err(e), started);
                return Ok(());
            }
            if cmd == CMD_READ {
                // SAFETY: our caller keeps the lending contract.
                unsafe { take_data(link, rx, cookie, 0, u64::from(len)) }.await?;
            }
            link.finish(cookie, Ok(()), started);
            Ok(())
        }
        STRUCTURED_REPLY_MAGIC => {
            // SAFETY: our caller keeps the lending contract.
            let h = unsafe { rx.need(20) }.await?;
            let flags = be16(&h[4..6]);
            let kind = be16(&h[6..8]);
            let cookie = be64(&h[8..16]);
            let length = be32(&h[16..20]);
            rx.consume(20);
            let (cmd, off, len) = link.expected(cookie).ok_or_else(|| {
                garbage(format!("structured reply for cookie {cookie}, never sent"))
            })?;
            let done = flags & REPLY_FLAG_DONE != 0;
            match kind {
                REPLY_TYPE_NONE => {
                    if length != 0 || !done {
                        return Err(garbage(format!(
                            "NBD_REPLY_TYPE_NONE with length {length} and flags {flags:#x}"
                        )));
                    }
                }
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    if cmd != CMD_READ {
                        return Err(garbage(format!("a data chunk for a {}", cmd_name(cmd))));
                    }
                    let hole = kind == REPLY_TYPE_OFFSET_HOLE;
                    if (hole && length != 12) || (!hole && length <= 8) {
                        return Err(garbage(format!("data chunk of length {length}")));
                    }
                    // SAFETY: our caller keeps the lending contract.
                    let b = unsafe { rx.need(if hole { 12 } else { 8 }) }.await?;
                    let at = be64(b);
                    let n = if hole {
                        u64::from(be32(&b[8..12]))
                    } else {
                        u64::from(length - 8)
                    };
                    rx.consume(if hole { 12 } else { 8 });
                    let end = u64::from(len) + off;
                    if at < off || at.checked_add(n).is_none_or(|e| e > end) || n == 0 {
                        return Err(garbage(format!(
                            "chunk at byte {at} length {n} outside the read at byte {off} \
                             length {len}"
                        )));
                    }
                    if hole {
                        if !link.deliver(cookie, at - off, None, n) {
                            return Err(garbage(format!("hole at byte {at} overlaps a chunk")));
                        }
                    } else {
                        // SAFETY: our caller keeps the lending contract.
                        unsafe { take_data(link, rx, cookie, at - off, n) }.await?;
                    }
                }
                REPLY_TYPE_ERROR | REPLY_TYPE_ERROR_OFFSET => {
                    let extra: usize = if kind == REPLY_TYPE_ERROR_OFFSET {
                        8
                    } else {
                        0
                    };
                    if (length as usize) < 6 + extra || length as usize > 6 + extra + MAX_ERROR_MSG
                    {
                        return Err(garbage(format!("error chunk of length {length}")));
                    }
                    // SAFETY: our caller keeps the lending contract.
                    let b = unsafe { rx.need(length as usize) }.await?;
                    let err = be32(b);
                    let mlen = be16(&b[4..6]) as usize;
                    if 6 + mlen + extra != length as usize {
                        return Err(garbage(format!(
                            "error chunk of length {length} with a {mlen}-byte message"
                        )));
                    }
                    let text = String::from_utf8_lossy(&b[6..6 + mlen]).into_owned();
                    let at = if extra > 0 { be64(&b[6 + mlen..]) } else { off };
                    rx.consume(length as usize);
                    if err == 0 {
                        return Err(garbage("an error chunk with error 0".into()));
                    }
                    link.note_error(cookie, server_error(link, cmd, at, len, err, &text));
                }
                REPLY_TYPE_BLOCK_STATUS => {
                    return Err(garbage("block status that was never asked for".into()));
                }
                k if k & (1 << 15) != 0 => {
                    // An error type we do not know: an error all the same (the spec says so).
                    if length as usize > 6 + MAX_ERROR_MSG + 8 {
                        return Err(garbage(format!("error chunk of length {length}")));
                    }
                    // SAFETY: our caller keeps the lending contract.
                    unsafe { rx.need(length as usize) }.await?;
                    rx.consume(length as usize);
                    link.note_error(
                        cookie,
                        IoError::eio(format!(
                            "{}: {} at byte {off}: error chunk of unknown type {k}",
                            link.label(),
                            cmd_name(cmd)
                        )),
                    );
                }
                k => return Err(garbage(format!("unknown reply chunk type {k}"))),
            }
            if done {
                link.finish(cookie, Ok(()), started);
            }
            Ok(())
        }
        m => Err(garbage(format!("bad reply magic {m:#010x}"))),
    }
}

/// Moves `n` bytes of read data from the socket into the request at `at`.
///
/// # Safety
/// As [`read_replies`].
async unsafe fn take_data(
    link: &Link,
    rx: &mut Receiver,
    cookie: u64,
    mut at: u64,
    mut n: u64,
) -> Result<(), Broken> {
    while n > 0 {
        let step = n.min(rx.capacity() as u64) as usize;
        // SAFETY: our caller keeps the lending contract.
        let data = unsafe { rx.need(step) }.await?;
        if !link.deliver(cookie, at, Some(data), step as u64) {
            return Err(garbage(format!(
                "read data at byte {at} overlaps a chunk or lies outside the request"
            )));
        }
        rx.consume(step);
        at += step as u64;
        n -= step as u64;
    }
    Ok(())
}

fn server_error(link: &Link, cmd: u16, off: u64, len: u32, err: u32, text: &str) -> IoError {
    let errno = errno_of(err);
    let text: String = text.chars().filter(|c| !c.is_control()).take(200).collect();
    let tail = if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    };
    IoError::new(
        errno,
        format!(
            "{}: {} at byte {off} length {len}: server error {err}{tail}",
            link.label(),
            cmd_name(cmd)
        ),
    )
}
