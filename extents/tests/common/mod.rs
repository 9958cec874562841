//! Shared helpers for the extent tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use tempfile::TempDir;

/// A temporary directory on the ext4 root, where O_DIRECT is real.
pub fn direct_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("extents-test-")
        .tempdir_in("/var/tmp")
        .unwrap()
}

/// A temporary directory on tmpfs, where the extent falls back to buffered I/O.
pub fn tmpfs_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("extents-test-")
        .tempdir_in("/dev/shm")
        .unwrap()
}

/// A buffer of `len` bytes whose first byte sits at `shift` bytes past a 4 KiB boundary
/// (shift 0 gives an O_DIRECT-aligned buffer, anything else a misaligned one).
pub struct TestBuf {
    store: Vec<u8>,
    start: usize,
    len: usize,
}

impl TestBuf {
    pub fn new(len: usize, shift: usize) -> TestBuf {
        let store = vec![0u8; len + 8192 + shift];
        let base = store.as_ptr() as usize;
        let start = (4096 - base % 4096) % 4096 + shift;
        TestBuf { store, start, len }
    }
    pub fn filled(data: &[u8], shift: usize) -> TestBuf {
        let mut b = TestBuf::new(data.len(), shift);
        b.as_mut().copy_from_slice(data);
        b
    }
}

impl AsRef<[u8]> for TestBuf {
    fn as_ref(&self) -> &[u8] {
        &self.store[self.start..self.start + self.len]
    }
}

impl AsMut<[u8]> for TestBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.store[self.start..self.start + self.len]
    }
}

/// Deterministic pattern bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Allocated 512-byte blocks of a file.
pub fn st_blocks(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A loop device over a backing file, detached on drop.
pub struct LoopDev {
    pub dev: PathBuf,
}

impl LoopDev {
    /// Attaches `backing`; panics (fails the test loudly) if losetup is unusable.
    pub fn attach(backing: &Path) -> LoopDev {
        assert!(
            is_root(),
            "loop-device tests need root (losetup); they do not skip silently"
        );
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(backing)
            .output()
            .expect("losetup must be installed for the block-device tests (util-linux)");
        assert!(
            out.status.success(),
            "losetup -f --show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dev = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().to_string());
        LoopDev { dev }
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// Makes an ext4 file system on `dev`; panics (fails the test loudly) if mkfs.ext4 is missing
/// or fails.
pub fn mkfs_ext4(dev: &Path) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(dev)
        .output()
        .expect("mkfs.ext4 (e2fsprogs) is needed; this test does not skip silently");
    assert!(
        out.status.success(),
        "mkfs.ext4 {} failed: {}",
        dev.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A file system mounted from a block device, unmounted on drop.
pub struct Mount {
    pub dir: PathBuf,
}

impl Mount {
    /// Mounts `dev` on `dir` (created); panics if that fails.
    pub fn new(dev: &Path, dir: PathBuf) -> Mount {
        assert!(
            is_root(),
            "mount needs root; this test does not skip silently"
        );
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .arg(dev)
            .arg(&dir)
            .output()
            .expect("mount must be available");
        assert!(
            out.status.success(),
            "mount {} failed: {}",
            dev.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// A size-limited tmpfs mount, unmounted on drop.
pub struct SmallTmpfs {
    pub dir: TempDir,
}

impl SmallTmpfs {
    pub fn mount(size: &str) -> SmallTmpfs {
        assert!(
            is_root(),
            "mounting a tmpfs needs root; this test does not skip silently"
        );
        let dir = tempfile::Builder::new()
            .prefix("extents-mnt-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("mount must be available");
        assert!(st.success(), "mount -t tmpfs failed");
        SmallTmpfs { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
