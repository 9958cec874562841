//! The CHAP secret: read from the file `chap-secret-file=` names, only if that file is private
//! to the running user; held so that it never reaches a message, a log line or `Debug` output.

use std::ffi::CString;
use std::fmt;
use std::path::Path;

use crate::net::private::check_private;

/// A CHAP secret. Its `Debug` shows no byte of it; its memory is zeroed when dropped.
pub(crate) struct Secret(Option<CString>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The secret as libiscsi takes it.
    pub(crate) fn as_cstr(&self) -> &std::ffi::CStr {
        self.0.as_deref().unwrap_or(c"")
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            let mut v = c.into_bytes_with_nul();
            for b in v.iter_mut() {
                // SAFETY: `b` is a valid, exclusive reference into `v`; a volatile write keeps
                // the zeroing from being optimised away.
                unsafe { std::ptr::write_volatile(b, 0) };
            }
        }
    }
}

/// Reads the secret in `path`: refused unless the file belongs to the running user and
/// neither its group nor others may read or write it (mode 0600 or stricter). The first line
/// is the secret (a trailing newline is not part of it). Errors name the file, never its
/// contents.
pub(crate) fn read_secret(path: &Path) -> Result<Secret, String> {
    let shown = path.display();
    check_private("chap-secret-file", "the CHAP secret", path)?;
    let mut bytes = std::fs::read(path).map_err(|e| format!("chap-secret-file {shown}: {e}"))?;
    let end = bytes
        .iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .unwrap_or(bytes.len());
    for b in bytes[end..].iter_mut() {
        *b = 0;
    }
    bytes.truncate(end);
    if bytes.is_empty() {
        return Err(format!("chap-secret-file {shown}: the file is empty"));
    }
    match CString::new(bytes) {
        Ok(c) => Ok(Secret(Some(c))),
        Err(e) => {
            let mut v = e.into_vec();
            v.iter_mut().for_each(|b| *b = 0);
            Err(format!(
                "chap-secret-file {shown}: the secret holds a NUL byte"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(dir: &Path, name: &str, text: &[u8], mode: u32) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn only_private_files_are_read_and_nothing_leaks() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let s = read_secret(&file(d, "ok", b"s3cr3t-passw0rd\n", 0o600)).unwrap();
        assert_eq!(s.as_cstr().to_bytes(), b"s3cr3t-passw0rd");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(read_secret(&file(d, "ro", b"abcdefabcdef", 0o400)).is_ok());

        let e = read_secret(&file(d, "open", b"s3cr3t-passw0rd", 0o644)).unwrap_err();
        assert!(e.contains("mode 0644") && e.contains("/open"), "{e}");
        assert!(!e.contains("s3cr3t"), "{e}");
        let e = read_secret(&file(d, "grp", b"s3cr3t-passw0rd", 0o640)).unwrap_err();
        assert!(e.contains("mode 0640"), "{e}");
        let e = read_secret(&file(d, "empty", b"\n", 0o600)).unwrap_err();
        assert!(e.contains("empty"), "{e}");
        let e = read_secret(&d.join("missing")).unwrap_err();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn a_file_of_another_user_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = file(dir.path(), "theirs", b"s3cr3t-passw0rd", 0o600);
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let other = if me == 65534 { 65533 } else { 65534 };
        std::os::unix::fs::chown(&p, Some(other), None)
            .expect("chown needs root: our machines run the tests as root");
        let e = read_secret(&p).unwrap_err();
        assert!(
            e.contains(&format!("uid {other}")) && e.contains("0600"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t"), "{e}");
    }
}
