//! The handshake phase: fixed-newstyle option haggling.

use std::io;
use std::os::fd::RawFd;

use crate::proto::*;
use crate::server::{ExportEntry, Shared};
use crate::sock::{send_all, RecvBuf};
use crate::tls::TlsMode;

/// Longest option payload we read; longer ones get `NBD_REP_ERR_TOO_BIG` and a hard
/// disconnect (the largest legitimate one, `NBD_OPT_GO`, is a 4 KiB name plus a few info
/// requests).
const MAX_OPTION_LEN: u32 = 16 * 1024;
/// Options per connection before we decide the client is wasting our time.
const MAX_OPTIONS: usize = 1024;

/// How the handshake ended.
pub(crate) enum Outcome {
    /// The client asked for TLS and was told yes: run the session, then go on with
    /// [`options`] over it (the client's flags are carried over).
    StartTls(Greeting),
    /// Enter transmission on this export number; the flag says whether structured replies
    /// were negotiated.
    Transmit(usize, bool),
    /// The client aborted (or left) politely.
    Done,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// One option reply: header plus data.
fn opt_reply(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + data.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

/// Runs the handshake on a fresh connection.
///
/// # Safety
/// The kernel receives into `rb` (and sends from this future's own buffers) until each
/// operation completes: keep the [lending contract](tables::io#the-lending-contract) for the
/// returned future.
pub(crate) async unsafe fn handshake(
    shared: &Shared,
    fd: RawFd,
    rb: &mut RecvBuf,
) -> io::Result<Outcome> {
    // SAFETY: our caller keeps the lending contract.
    let g = unsafe { greeting(fd, rb) }.await?;
    // SAFETY: as above.
    unsafe { options(shared, fd, rb, g, false) }.await
}

/// What the client said in its flags.
#[derive(Clone, Copy)]
pub(crate) struct Greeting {
    fixed: bool,
    no_zeroes: bool,
}

/// The server's greeting and the client's flags.
///
/// # Safety
/// As [`handshake`].
async unsafe fn greeting(fd: RawFd, rb: &mut RecvBuf) -> io::Result<Greeting> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    send_all(fd, &hello).await?;

    let mut cf = [0u8; 4];
    rb.read_exact(&mut cf).await?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The spec requires closing on client flags we do not know.
        return Err(protocol_error(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(Greeting {
        fixed: client_flags & FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// The option haggling, in the clear or (`tls`) over a TLS session already running (when
/// every option state from before `NBD_OPT_STARTTLS` is forgotten, as the spec says).
///
/// # Safety
/// As [`handshake`].
pub(crate) async unsafe fn options(
    shared: &Shared,
    fd: RawFd,
    rb: &mut RecvBuf,
    g: Greeting,
    tls: bool,
) -> io::Result<Outcome> {
    let Greeting { fixed, no_zeroes } = g;
    let mut structured = false;
    let mode = shared.tls.as_ref().map_or(TlsMode::Off, |t| t.mode);
    let tls_required = mode == TlsMode::Require && !tls;

    for _ in 0..MAX_OPTIONS {
        let mut oh = [0u8; 16];
        rb.read_exact(&mut oh).await?;
        let magic = be64(&oh[0..8]);
        let option = be32(&oh[8..12]);
        let len = be32(&oh[12..16]);
        if magic != IHAVEOPT {
            return Err(protocol_error(format!("bad option magic {magic:#x}")));
        }
        if !fixed && option != OPT_EXPORT_NAME {
            // Plain newstyle clients can only name an export; anything else is fatal there.
            return Err(protocol_error(format!(
                "option {option} from a client without fixed newstyle"
            )));
        }
        if len > MAX_OPTION_LEN {
            if fixed && option != OPT_EXPORT_NAME {
                let msg =
                    format!("option data of {len} bytes is too long (limit {MAX_OPTION_LEN})");
                let _ = send_all(fd, &opt_reply(option, REP_ERR_TOO_BIG, msg.as_bytes())).await;
            }
            return Err(protocol_error(format!(
                "option {option} with {len} bytes of data"
            )));
        }
        let mut data = vec![0u8; len as usize];
        rb.read_exact(&mut data).await?;

        if shared.is_stopping() && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Err(protocol_error("server is shutting down"));
            }
            send_all(
                fd,
                &opt_reply(option, REP_ERR_SHUTDOWN, b"server is shutting down"),
            )
            .await?;
            continue;
        }

        if tls_required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                // No way to report an error to NBD_OPT_EXPORT_NAME: hard disconnect.
                return Err(protocol_error(
                    "TLS is required; the client asked for an export",
                ));
            }
            send_all(
                fd,
                &opt_reply(option, REP_ERR_TLS_REQD, b"this server requires TLS"),
            )
            .await?;
            continue;
        }
        match option {
            OPT_STARTTLS => {
                if mode == TlsMode::Off {
                    send_all(
                        fd,
                        &opt_reply(option, REP_ERR_UNSUP, b"this server does not offer TLS"),
                    )
                    .await?;
                } else if tls {
                    send_all(
                        fd,
                        &opt_reply(option, REP_ERR_INVALID, b"TLS is already running"),
                    )
                    .await?;
                } else if !data.is_empty() {
                    send_all(
                        fd,
                        &opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data"),
                    )
                    .await?;
                } else {
                    send_all(fd, &opt_reply(option, REP_ACK, &[])).await?;
                    return Ok(Outcome::StartTls(g));
                }
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(idx) = shared.find_export(&name) else {
                    // No way to report an error to NBD_OPT_EXPORT_NAME: hard disconnect.
                    return Err(protocol_error(format!("unknown export '{name}'")));
                };
                let e = &shared.exports[idx];
                let mut r = Vec::with_capacity(10 + 124);
                r.extend_from_slice(&e.size().to_be_bytes());
                r.extend_from_slice(&e.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                send_all(fd, &r).await?;
                return Ok(Outcome::Transmit(idx, structured));
            }
            OPT_ABORT => {
                // The client closes next; a failed ACK changes nothing.
                let _ = send_all(fd, &opt_reply(option, REP_ACK, &[])).await;
                return Ok(Outcome::Done);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    send_all(
                        fd,
                        &opt_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"),
                    )
                    .await?;
                    continue;
                }
                let mut out = Vec::new();
                for e in shared.exports.iter() {
                    let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    d.extend_from_slice(e.name.as_bytes());
                    d.extend_from_slice(e.description.as_bytes());
                    out.extend_from_slice(&opt_reply(option, REP_SERVER, &d));
                }
                out.extend_from_slice(&opt_reply(option, REP_ACK, &[]));
                send_all(fd, &out).await?;
            }
            OPT_STRUCTURED_REPLY => {
                if data.is_empty() {
                    structured = true;
                    send_all(fd, &opt_reply(option, REP_ACK, &[])).await?;
                } else {
                    let msg = b"NBD_OPT_STRUCTURED_REPLY takes no data";
                    send_all(fd, &opt_reply(option, REP_ERR_INVALID, msg)).await?;
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(msg) => {
                    send_all(fd, &opt_reply(option, REP_ERR_INVALID, msg.as_bytes())).await?;
                }
                Ok((name, infos)) => {
                    let Some(idx) = shared.find_export(&name) else {
                        let msg = format!("no export named '{name}'");
                        send_all(fd, &opt_reply(option, REP_ERR_UNKNOWN, msg.as_bytes())).await?;
                        continue;
                    };
                    let e = &shared.exports[idx];
                    send_all(fd, &info_replies(option, e, &infos)).await?;
                    if option == OPT_GO {
                        return Ok(Outcome::Transmit(idx, structured));
                    }
                }
            },
            _ => {
                let msg = format!("option {option} is not supported by this server");
                send_all(fd, &opt_reply(option, REP_ERR_UNSUP, msg.as_bytes())).await?;
            }
        }
    }
    Err(protocol_error(format!(
        "more than {MAX_OPTIONS} options in one handshake"
    )))
}

/// Parses `NBD_OPT_INFO`/`NBD_OPT_GO` data: name and the list of requested info items.
fn parse_info_request(data: &[u8]) -> Result<(String, Vec<u16>), String> {
    if data.len() < 6 {
        return Err(format!("option data of {} bytes is too short", data.len()));
    }
    let nlen = be32(&data[0..4]) as usize;
    if nlen > MAX_STRING || data.len() < 4 + nlen + 2 {
        return Err(format!(
            "export name length {nlen} does not fit the option data"
        ));
    }
    let name = std::str::from_utf8(&data[4..4 + nlen])
        .map_err(|_| "export name is not UTF-8".to_string())?
        .to_string();
    let rest = &data[4 + nlen..];
    let count = u16::from_be_bytes([rest[0], rest[1]]) as usize;
    if rest.len() != 2 + 2 * count {
        return Err(format!(
            "{count} info requests do not match {} bytes of data",
            rest.len() - 2
        ));
    }
    let infos = rest[2..]
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, infos))
}

/// The `NBD_REP_INFO` items for an export, then the final ACK.
fn info_replies(option: u32, e: &ExportEntry, requested: &[u16]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut export = Vec::with_capacity(12);
    export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    export.extend_from_slice(&e.size().to_be_bytes());
    export.extend_from_slice(&e.transmission_flags().to_be_bytes());
    out.extend_from_slice(&opt_reply(option, REP_INFO, &export));

    // Block sizes are sent unasked too: a client that ignores them still works, since every
    // device handles any byte range.
    let (min, pref, max) = e.block_sizes();
    let mut bs = Vec::with_capacity(14);
    bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    bs.extend_from_slice(&min.to_be_bytes());
    bs.extend_from_slice(&pref.to_be_bytes());
    bs.extend_from_slice(&max.to_be_bytes());
    out.extend_from_slice(&opt_reply(option, REP_INFO, &bs));

    if requested.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(e.name.as_bytes());
        out.extend_from_slice(&opt_reply(option, REP_INFO, &d));
    }
    if requested.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(e.description.as_bytes());
        out.extend_from_slice(&opt_reply(option, REP_INFO, &d));
    }
    out.extend_from_slice(&opt_reply(option, REP_ACK, &[]));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parsing_checks_every_length() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Ok(("abc".to_string(), vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
        // One byte short, one too many, a name longer than the data.
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long.push(0);
        assert!(parse_info_request(&long).is_err());
        let mut bad = d.clone();
        bad[0..4].copy_from_slice(&100u32.to_be_bytes());
        assert!(parse_info_request(&bad).is_err());
        assert!(parse_info_request(&[0, 0]).is_err());
    }
}
