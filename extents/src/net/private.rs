//! Files that hold secrets (a CHAP secret, a Ceph keyring): used only if private to the
//! running user.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Checks that `path` (named `label` in messages, the option that names it) is a regular file
/// of the running user that neither its group nor others may read or write (mode 0600 or
/// stricter); `holds` says what it holds ("the CHAP secret"). Errors name the file, never
/// its contents.
pub(crate) fn check_private(label: &str, holds: &str, path: &Path) -> Result<(), String> {
    let shown = path.display();
    let md = std::fs::metadata(path).map_err(|e| format!("{label} {shown}: {e}"))?;
    if !md.is_file() {
        return Err(format!("{label} {shown}: not a regular file"));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{label} {shown} has mode {mode:04o}: others could read {holds}; make it 0600 \
             (chmod 600 {shown})"
        ));
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if md.uid() != me {
        return Err(format!(
            "{label} {shown} (mode {mode:04o}) belongs to uid {}, not to the running user \
             (uid {me})",
            md.uid()
        ));
    }
    Ok(())
}
