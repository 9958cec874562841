//! The daemon's private mount namespace: a ublk server must not share the namespace of a
//! mounted `/dev/ublkbN` (see [`enter_private_mount_ns`]).

/// Makes this process's mounts private in a new mount namespace: a ublk server that shares the
/// mount namespace of a mounted `/dev/ublkbN` can deadlock on exit (the kernel waits for the
/// device's last opener while the opener waits for the server).
///
/// The new namespace starts as a copy of the caller's, so a daemon restarted after a crash
/// while a `/dev/ublkbN` is mounted would hold its own copy of that mount: the administrator's
/// `umount` would then leave the filesystem alive (dirty, "in use") inside the daemon, and
/// stopping the device would hit it with I/O errors and hang. So every filesystem on a ublk
/// device is detached from the new namespace (only there; the caller's mounts are untouched).
pub fn enter_private_mount_ns() -> std::io::Result<()> {
    // SAFETY: plain syscalls with constant arguments.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let root = c"/";
        if libc::mount(
            std::ptr::null(),
            root.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    detach_ublk_mounts();
    Ok(())
}

/// Lazily unmounts, in this process's (private) mount namespace, every filesystem whose source
/// is a ublk block device (by name or by the `ublkb` block major). Failures are logged: a
/// mount left behind only matters if that device is later stopped while it is still mounted.
fn detach_ublk_mounts() {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let ublk_major = std::fs::read_to_string("/proc/devices").ok().and_then(|d| {
        d.split("Block devices:").nth(1).and_then(|b| {
            b.lines().find_map(|l| {
                let mut w = l.split_whitespace();
                let major = w.next()?;
                (w.next() == Some("ublkb")).then(|| major.to_string())
            })
        })
    });
    // Children before parents: mountinfo lists parents first.
    for line in info.lines().rev() {
        let fields: Vec<&str> = line.split(' ').collect();
        let Some(sep) = fields.iter().position(|f| *f == "-") else {
            continue;
        };
        let (Some(majmin), Some(target), Some(source)) =
            (fields.get(2), fields.get(4), fields.get(sep + 2))
        else {
            continue;
        };
        let by_major = ublk_major
            .as_deref()
            .is_some_and(|m| majmin.split(':').next() == Some(m));
        if !(by_major || source.starts_with("/dev/ublkb")) {
            continue;
        }
        let target = unescape_mountinfo(target);
        let Ok(c) = std::ffi::CString::new(target.clone()) else {
            continue;
        };
        // SAFETY: umount2 with a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            log::warn!(
                "cannot detach {source} on {target} from the daemon's mount namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let oct = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        if let Some(v) = oct {
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescape() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/x\\134y\\011"), "/x\\y\t");
        assert_eq!(unescape_mountinfo("/plain\\"), "/plain\\");
    }
}
