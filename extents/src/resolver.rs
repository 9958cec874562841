//! [`FileResolver`]: opens the devices table lines name (paths, or `major:minor` as
//! `dmsetup table` prints them) as [`FileExtent`]s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use tables::registry::Resolver;
use tables::DeviceRef;

use crate::file::{ExtentError, FileExtent, OpenOptions};
use crate::sys;

/// What identifies one underlying file or device, whatever path reached it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
enum FileId {
    Inode { dev: (u32, u32), ino: u64 },
    Block { rdev: (u32, u32) },
}

/// What a relative path in a table means to a [`FileResolver`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum RelativePaths {
    /// Relative to the process's working directory: right for a command that reads a table
    /// file given on its own command line.
    #[default]
    WorkingDir,
    /// Refused with [`ExtentError::RelativePath`]: a daemon's working directory has nothing to
    /// do with the tables it is sent, so its clients must send absolute paths.
    Refuse,
    /// Relative to this directory, which must itself be absolute (a relative one makes every
    /// relative path refused).
    Base(PathBuf),
}

/// Opens paths and `major:minor` device numbers as extents, and (through [`Resolver::open`])
/// network extents named by URIs.
///
/// The same file or device named twice (by the same path, another path, a symlink, or its
/// device number) returns the same `Arc` while the first is alive, so a table whose lines share
/// a device shares one fd, one flush and one set of range locks (and, for a block device, one
/// exclusive claim: see [`OpenOptions::exclusive`]).
pub struct FileResolver {
    opts: OpenOptions,
    relative: RelativePaths,
    cache: Mutex<HashMap<FileId, Weak<FileExtent>>>,
    /// Network extents by URI: lines naming the same export share its connections.
    net: Mutex<HashMap<String, crate::net::WeakNetExtent>>,
}

impl FileResolver {
    /// A resolver opening every extent with `opts`, taking relative paths from the working
    /// directory.
    pub fn new(opts: OpenOptions) -> FileResolver {
        FileResolver {
            opts,
            relative: RelativePaths::default(),
            cache: Mutex::new(HashMap::new()),
            net: Mutex::new(HashMap::new()),
        }
    }

    /// The same resolver, with relative paths taken as `relative` says.
    pub fn relative_paths(mut self, relative: RelativePaths) -> FileResolver {
        self.relative = relative;
        self
    }

    /// Where `dev` points, with relative paths dealt with as this resolver was told.
    pub fn resolve(&self, dev: &str) -> Result<PathBuf, ExtentError> {
        let path = Self::locate(dev)?;
        if path.is_absolute() {
            return Ok(path);
        }
        let refused = |base: Option<&Path>| ExtentError::RelativePath {
            path: dev.to_string(),
            base: base.map(|b| b.display().to_string()),
        };
        match &self.relative {
            RelativePaths::WorkingDir => Ok(path),
            RelativePaths::Refuse => Err(refused(None)),
            RelativePaths::Base(b) if b.is_absolute() => Ok(b.join(path)),
            RelativePaths::Base(b) => Err(refused(Some(b))),
        }
    }

    /// Where `dev` points: a path (as given, relative or not), or `/dev/...` for a
    /// `major:minor` pair. [`FileResolver::resolve`] also applies [`RelativePaths`].
    pub fn locate(dev: &str) -> Result<PathBuf, ExtentError> {
        if let Some((maj, min)) = parse_devnum(dev) {
            let node = sys::devnode(maj, min).map_err(|e| ExtentError::Io {
                path: dev.to_string(),
                what: format!("find block device {maj}:{min}"),
                source: e,
            })?;
            return Ok(node);
        }
        if dev.is_empty() {
            return Err(ExtentError::Unsupported {
                path: dev.to_string(),
                msg: "empty device name".into(),
            });
        }
        Ok(PathBuf::from(dev))
    }

    /// Opens (or finds already open) the extent `dev` names.
    pub fn open_extent(&self, dev: &str) -> Result<Arc<FileExtent>, ExtentError> {
        let path = self.resolve(dev)?;
        let canon = std::fs::canonicalize(&path).map_err(|e| ExtentError::Io {
            path: path.display().to_string(),
            what: "resolve path".into(),
            source: e,
        })?;
        let id = file_id(&canon)?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ext) = cache.get(&id).and_then(Weak::upgrade) {
            // A reload after the file or device grew must see its new size.
            ext.refresh_size()?;
            return Ok(ext);
        }
        let ext = Arc::new(FileExtent::open(&canon, self.opts)?);
        cache.retain(|_, w| w.strong_count() > 0);
        cache.insert(id, Arc::downgrade(&ext));
        Ok(ext)
    }
}

impl Default for FileResolver {
    fn default() -> FileResolver {
        FileResolver::new(OpenOptions::default())
    }
}

impl FileResolver {
    /// Opens (or finds already open) the network extent `dev` names (see [`crate::net`]).
    pub fn open_network(&self, dev: &str) -> Result<crate::net::NetExtent, crate::net::NetError> {
        let lock = || self.net.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(d) = lock().get(dev).and_then(|w| w.upgrade()) {
            return Ok(d);
        }
        // Connecting may take up to the connect-timeout: not under the cache's lock, which
        // status reports (`extent_health`) and every other open take too.
        let d = crate::net::open(dev)?;
        let mut cache = lock();
        if let Some(other) = cache.get(dev).and_then(|w| w.upgrade()) {
            // Another open of the same name won the race: share its connections.
            return Ok(other);
        }
        cache.retain(|_, w| w.alive());
        cache.insert(dev.to_string(), d.downgrade());
        Ok(d)
    }
}

impl Resolver for FileResolver {
    fn open(&self, dev: &str) -> Result<DeviceRef, String> {
        if crate::net::NetUri::is_network(dev) {
            return self
                .open_network(dev)
                .map(|e| e.device())
                .map_err(|e| e.to_string());
        }
        self.open_extent(dev)
            .map(|e| e as DeviceRef)
            .map_err(|e| e.to_string())
    }

    fn check_remote(&self, dev: &str) -> Option<Result<(), String>> {
        crate::net::NetUri::is_network(dev).then(|| {
            crate::net::NetUri::parse(dev)
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn extent_health(&self, dev: &str) -> Option<tables::registry::ExtentHealth> {
        let cache = self.net.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(dev).and_then(|w| w.upgrade()).map(|e| e.health())
    }
}

fn parse_devnum(s: &str) -> Option<(u32, u32)> {
    let (a, b) = s.split_once(':')?;
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
    if !digits(a) || !digits(b) {
        return None;
    }
    Some((a.parse().ok()?, b.parse().ok()?))
}

fn file_id(path: &Path) -> Result<FileId, ExtentError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path).map_err(|e| ExtentError::Io {
        path: path.display().to_string(),
        what: "stat".into(),
        source: e,
    })?;
    let split = |d: u64| {
        // glibc's dev_t encoding.
        let major = ((d >> 8) & 0xfff) | ((d >> 32) & !0xfff);
        let minor = (d & 0xff) | ((d >> 12) & !0xff);
        (major as u32, minor as u32)
    };
    Ok(if md.file_type().is_block_device() {
        FileId::Block {
            rdev: split(md.rdev()),
        }
    } else {
        FileId::Inode {
            dev: split(md.dev()),
            ino: md.ino(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devnum_parsing() {
        assert_eq!(parse_devnum("7:0"), Some((7, 0)));
        assert_eq!(parse_devnum("254:16"), Some((254, 16)));
        assert_eq!(parse_devnum("/dev/sda"), None);
        assert_eq!(parse_devnum("7:"), None);
        assert_eq!(parse_devnum("a:1"), None);
        assert_eq!(parse_devnum("./7:0"), None);
    }

    #[test]
    fn a_slow_connect_does_not_hold_up_status_or_other_opens() {
        // A server that accepts and then says nothing: the open waits its connect-timeout.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let r = std::sync::Arc::new(FileResolver::default());
        let r2 = r.clone();
        let slow = std::thread::spawn(move || {
            r2.open(&format!("nbd://127.0.0.1:{port}/?connect-timeout=3"))
                .map(|_| ())
        });
        let (_conn, _) = l.accept().unwrap();
        let t = std::time::Instant::now();
        assert_eq!(r.extent_health("nbd://127.0.0.1:1/x"), None);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(1),
            "status waited {:?} for another extent's connect",
            t.elapsed()
        );
        assert!(slow.join().unwrap().is_err());
    }

    #[test]
    fn devnum_of_a_missing_device_names_it() {
        let e = FileResolver::locate("4095:1048575")
            .unwrap_err()
            .to_string();
        assert!(e.contains("4095:1048575"), "{e}");
    }
}
