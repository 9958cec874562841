//! Network extent names as the ecosystem spells them (libnbd's and qemu's URIs):
//! `nbd://HOST[:PORT]/EXPORT`, `nbds://…`, `nbd+unix:///EXPORT?socket=PATH` and
//! `iscsi://[USER@]HOST[:PORT]/TARGET-IQN/LUN`, each with `?key=value&…` options; and the
//! Ceph names (qemu's spelling for RBD): `rbd:POOL/IMAGE[@SNAP][?…]` and
//! `rados:POOL/PREFIX?object_size=SIZE&size=SIZE[&…]`.
//!
//! Parsing never connects: `volmgr table check` uses it to validate table lines. Secrets never
//! appear in a URI (a password in the user part is refused): they come from files the options
//! name, so a table, `dev table` and logs can print the URI as it is.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// NBD's IANA port.
pub const NBD_DEFAULT_PORT: u16 = 10809;
/// iSCSI's IANA port.
pub const ISCSI_DEFAULT_PORT: u16 = 3260;

/// A URI that names a network extent, or why a name is not one.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{uri}: {msg}")]
pub struct UriError {
    /// The name as given.
    pub uri: String,
    /// What is wrong with it.
    pub msg: String,
}

/// Where an NBD server listens.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NbdAddr {
    /// TCP: host name or address (IPv6 without brackets) and port.
    Tcp {
        /// Host name or literal address.
        host: String,
        /// Port.
        port: u16,
    },
    /// A Unix socket.
    Unix(PathBuf),
}

/// Options every network extent takes (`?key=value` in its URI).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NetOptions {
    /// How long a request may go unanswered before its connection is taken for dead, torn
    /// down and the request resent on a new one (`timeout=SECONDS`, default 30).
    pub timeout: Duration,
    /// How long requests wait for a working connection after one drops before they fail
    /// with EIO and the extent reports itself failed (`reconnect-delay=SECONDS`, qemu's name;
    /// default 30, 0 fails at once).
    pub reconnect_delay: Duration,
    /// How long opening a connection (TCP connect plus handshake) may take
    /// (`connect-timeout=SECONDS`, default 10).
    pub connect_timeout: Duration,
    /// Connections to open when the server says that is safe (NBD multi-conn;
    /// `connections=N`, default 1, at most 16).
    pub connections: u8,
}

impl Default for NetOptions {
    fn default() -> NetOptions {
        NetOptions {
            timeout: Duration::from_secs(30),
            reconnect_delay: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            connections: 1,
        }
    }
}

/// A parsed `nbd://`, `nbds://` or `nbd+unix://` URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NbdUri {
    /// Where the server is.
    pub addr: NbdAddr,
    /// Export name (may be empty: the server's default export).
    pub export: String,
    /// TLS was asked for (`nbds`).
    pub tls: bool,
    /// Directory with the x509 files (`tls-certificates=DIR`, qemu's and libnbd's layout):
    /// `ca-cert.pem` to verify the server, and optionally `client-cert.pem` with
    /// `client-key.pem` (mode 0600) to prove who we are.
    pub tls_certificates: Option<PathBuf>,
    /// The name the server's certificate must carry (`tls-hostname=`; default: the host).
    pub tls_hostname: Option<String>,
    /// Connection options.
    pub opts: NetOptions,
    /// The URI as given (it holds no secret), for messages.
    text: String,
}

/// A parsed `iscsi://` URI.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IscsiUri {
    /// CHAP user, if any (its secret comes from `chap-secret-file=`).
    pub user: Option<String>,
    /// Portal host.
    pub host: String,
    /// Portal port.
    pub port: u16,
    /// Target IQN.
    pub target: String,
    /// Logical unit number.
    pub lun: u16,
    /// File holding the CHAP secret (must be mode 0600 when read).
    pub chap_secret_file: Option<PathBuf>,
    /// Connection options.
    pub opts: NetOptions,
    text: String,
}

/// How to reach a Ceph cluster (`rbd:` and `rados:` options). The key itself never appears
/// in a name (`key=` is refused): it is in the keyring file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct CephClient {
    /// The cluster's configuration file (`conf=PATH`; default: librados's search,
    /// `$CEPH_CONF` then `/etc/ceph/ceph.conf`).
    pub conf: Option<PathBuf>,
    /// The client's id, `admin` in `client.admin` (`id=`; default: librados's, `admin`).
    pub id: Option<String>,
    /// The keyring file (`keyring=PATH`), which must be private to the running user (mode
    /// 0600 or stricter) when the extent is opened.
    pub keyring: Option<PathBuf>,
}

/// A parsed `rbd:POOL/IMAGE[@SNAP]` name: an RBD image, or one of its snapshots (read-only).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RbdUri {
    /// The pool.
    pub pool: String,
    /// The image.
    pub image: String,
    /// The snapshot, opened read-only.
    pub snap: Option<String>,
    /// How to reach the cluster.
    pub client: CephClient,
    /// Timeouts (`connections=` has no meaning here).
    pub opts: NetOptions,
    text: String,
}

/// A parsed `rados:POOL/PREFIX?object_size=SIZE&size=SIZE` name: a volume of `size` bytes
/// stored as the RADOS objects `PREFIX.%016x` (the object's index, lower-case hex, 16
/// digits) of `object_size` bytes each; byte `b` of the volume is byte `b % object_size` of
/// object `b / object_size`. Objects are created by the first write that touches them.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RadosUri {
    /// The pool.
    pub pool: String,
    /// The object-name prefix.
    pub prefix: String,
    /// Bytes per object (a power of two from 4 KiB to 128 MiB, the OSDs' default maximum).
    pub object_size: u64,
    /// The volume's size in bytes (a multiple of 512: there is no header to hold it).
    pub size: u64,
    /// How to reach the cluster.
    pub client: CephClient,
    /// Timeouts (`connections=` has no meaning here).
    pub opts: NetOptions,
    text: String,
}

impl RadosUri {
    /// The name of object `index`: `PREFIX.%016x`.
    pub fn object_name(&self, index: u64) -> String {
        format!("{}.{index:016x}", self.prefix)
    }
}

/// A network extent's name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum NetUri {
    /// An NBD export.
    Nbd(NbdUri),
    /// An iSCSI logical unit.
    Iscsi(IscsiUri),
    /// An RBD image or snapshot.
    Rbd(RbdUri),
    /// A run of RADOS objects.
    Rados(RadosUri),
}

impl NetUri {
    /// Whether `dev` is spelled as a network extent (a URI scheme we know), whether or not
    /// the rest of it parses: such names must never be taken for relative file paths.
    pub fn is_network(dev: &str) -> bool {
        [
            "nbd://",
            "nbds://",
            "nbd+unix://",
            "nbds+unix://",
            "iscsi://",
            "rbd:",
            "rados:",
        ]
        .iter()
        .any(|p| dev.starts_with(p))
    }

    /// Parses `dev`.
    pub fn parse(dev: &str) -> Result<NetUri, UriError> {
        let err = |msg: String| UriError {
            uri: dev.to_string(),
            msg,
        };
        // A refused `key=` must not reach the message: the name is shown without its value.
        let ceph_err = |msg: String| UriError {
            uri: redact_key(dev),
            msg,
        };
        if let Some(rest) = dev.strip_prefix("rbd:") {
            return parse_rbd(dev, rest).map_err(ceph_err);
        }
        if let Some(rest) = dev.strip_prefix("rados:") {
            return parse_rados(dev, rest).map_err(ceph_err);
        }
        let (scheme, rest) = dev
            .split_once("://")
            .ok_or_else(|| err("not a URI (no '://')".into()))?;
        let (body, query) = match rest.split_once('?') {
            Some((b, q)) => (b, Some(q)),
            None => (rest, None),
        };
        if body.contains('#') {
            return Err(err("fragments ('#') have no meaning here".into()));
        }
        let mut q = Query::parse(query).map_err(err)?;
        let uri = match scheme {
            "nbd" | "nbds" => {
                let (authority, path) = split_authority(body);
                let (user, host, port) =
                    parse_authority(authority, NBD_DEFAULT_PORT).map_err(err)?;
                if user.is_some() {
                    return Err(err("NBD URIs take no user name".into()));
                }
                if host.is_empty() {
                    return Err(err("no host (nbd://HOST[:PORT]/EXPORT)".into()));
                }
                let export = decode(path.strip_prefix('/').unwrap_or(path)).map_err(err)?;
                let opts = net_options(&mut q).map_err(err)?;
                let (tls_certificates, tls_hostname) =
                    tls_options(&mut q, scheme == "nbds").map_err(err)?;
                NetUri::Nbd(NbdUri {
                    addr: NbdAddr::Tcp { host, port },
                    export,
                    tls: scheme == "nbds",
                    tls_certificates,
                    tls_hostname,
                    opts,
                    text: dev.to_string(),
                })
            }
            "nbd+unix" | "nbds+unix" => {
                let (authority, path) = split_authority(body);
                if !authority.is_empty() {
                    return Err(err(
                        "a Unix-socket URI has no host (nbd+unix:///EXPORT?socket=PATH)".into(),
                    ));
                }
                let socket = q
                    .take("socket")
                    .ok_or_else(|| err("no socket=PATH option".into()))?;
                let socket = PathBuf::from(decode(&socket).map_err(err)?);
                if !socket.is_absolute() {
                    return Err(err(format!(
                        "socket={}: give an absolute path",
                        socket.display()
                    )));
                }
                let export = decode(path.strip_prefix('/').unwrap_or(path)).map_err(err)?;
                let opts = net_options(&mut q).map_err(err)?;
                let (tls_certificates, tls_hostname) =
                    tls_options(&mut q, scheme == "nbds+unix").map_err(err)?;
                NetUri::Nbd(NbdUri {
                    addr: NbdAddr::Unix(socket),
                    export,
                    tls: scheme == "nbds+unix",
                    tls_certificates,
                    tls_hostname,
                    opts,
                    text: dev.to_string(),
                })
            }
            "iscsi" => {
                let (authority, path) = split_authority(body);
                let (user, host, port) =
                    parse_authority(authority, ISCSI_DEFAULT_PORT).map_err(err)?;
                if host.is_empty() {
                    return Err(err(
                        "no host (iscsi://[USER@]HOST[:PORT]/TARGET-IQN/LUN)".into()
                    ));
                }
                let path = path.strip_prefix('/').unwrap_or(path);
                let (target, lun) = path.rsplit_once('/').ok_or_else(|| {
                    err("no LUN (iscsi://[USER@]HOST[:PORT]/TARGET-IQN/LUN)".into())
                })?;
                let target = decode(target).map_err(err)?;
                if target.is_empty() || target.contains('/') {
                    return Err(err(format!("'{target}' is not a target IQN")));
                }
                let lun: u16 = lun
                    .parse()
                    .map_err(|_| err(format!("LUN '{lun}' is not a number from 0 to 65535")))?;
                let chap_secret_file = q.take("chap-secret-file").map(PathBuf::from);
                if user.is_some() != chap_secret_file.is_some() {
                    return Err(err(
                        "CHAP needs both a user (iscsi://USER@HOST/...) and chap-secret-file=PATH"
                            .into(),
                    ));
                }
                let opts = net_options(&mut q).map_err(err)?;
                NetUri::Iscsi(IscsiUri {
                    user,
                    host,
                    port,
                    target,
                    lun,
                    chap_secret_file,
                    opts,
                    text: dev.to_string(),
                })
            }
            other => return Err(err(format!("unknown scheme '{other}'"))),
        };
        if let Some(k) = q.left() {
            return Err(err(format!("unknown option '{k}'")));
        }
        Ok(uri)
    }

    /// The connection options.
    pub fn options(&self) -> &NetOptions {
        match self {
            NetUri::Nbd(u) => &u.opts,
            NetUri::Iscsi(u) => &u.opts,
            NetUri::Rbd(u) => &u.opts,
            NetUri::Rados(u) => &u.opts,
        }
    }
}

/// Each URI type prints as it was given (it holds no secret).
macro_rules! display_as_given {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.text)
            }
        }
    )*};
}
display_as_given!(NbdUri, IscsiUri, RbdUri, RadosUri);

impl fmt::Display for NetUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetUri::Nbd(u) => u.fmt(f),
            NetUri::Iscsi(u) => u.fmt(f),
            NetUri::Rbd(u) => u.fmt(f),
            NetUri::Rados(u) => u.fmt(f),
        }
    }
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NbdAddr::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            NbdAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            NbdAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// `//authority/path` with the scheme already gone: the authority ends at the first '/'.
fn split_authority(body: &str) -> (&str, &str) {
    match body.find('/') {
        Some(i) => (&body[..i], &body[i..]),
        None => (body, ""),
    }
}

/// `[user@]host[:port]`, host possibly a bracketed IPv6 literal.
fn parse_authority(a: &str, default_port: u16) -> Result<(Option<String>, String, u16), String> {
    let (user, hostport) = match a.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, a),
    };
    let user = match user {
        Some(u) if u.contains(':') || u.contains('%') => {
            return Err(
                "a password in the URI is refused: name a file holding it (chap-secret-file=)"
                    .into(),
            )
        }
        Some("") => return Err("empty user name".into()),
        Some(u) => Some(decode(u)?),
        None => None,
    };
    let (host, port) = if let Some(rest) = hostport.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| "unterminated '[' in the host".to_string())?;
        match after {
            "" => (h.to_string(), None),
            p => (
                h.to_string(),
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("unexpected '{p}' after the host"))?,
                ),
            ),
        }
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("port '{p}' is not a number from 1 to 65535")),
        },
    };
    Ok((user, host, port))
}

/// Percent-decoding (`%2F`...); the result must be UTF-8 with no NUL.
fn decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("bad percent escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    let text = String::from_utf8(out).map_err(|_| format!("'{s}' is not UTF-8 once decoded"))?;
    if text.contains('\0') {
        return Err(format!("'{s}' holds a NUL byte"));
    }
    Ok(text)
}

/// The `key=value&…` options, each taken at most once.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Result<Query, String> {
        let mut v: Vec<(String, String)> = Vec::new();
        for kv in q.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, val) = kv
                .split_once('=')
                .ok_or_else(|| format!("option '{kv}' has no value (KEY=VALUE)"))?;
            if v.iter().any(|(x, _)| x == k) {
                return Err(format!("option '{k}' given twice"));
            }
            v.push((k.to_string(), val.to_string()));
        }
        Ok(Query(v))
    }

    fn take(&mut self, key: &str) -> Option<String> {
        let i = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(i).1)
    }

    fn left(&self) -> Option<&str> {
        self.0.first().map(|(k, _)| k.as_str())
    }
}

fn seconds(key: &str, v: &str, min: f64) -> Result<Duration, String> {
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= min && s <= 86_400.0 => Ok(Duration::from_secs_f64(s)),
        _ => Err(format!(
            "{key}={v}: give seconds from {min} to 86400 (fractions allowed)"
        )),
    }
}

/// `tls-certificates=DIR` (required with TLS) and `tls-hostname=NAME`, only with TLS.
fn tls_options(q: &mut Query, tls: bool) -> Result<(Option<PathBuf>, Option<String>), String> {
    let dir = q.take("tls-certificates").map(|d| decode(&d)).transpose()?;
    let host = q.take("tls-hostname").map(|h| decode(&h)).transpose()?;
    if !tls {
        if dir.is_some() || host.is_some() {
            return Err("TLS options need an nbds:// URI".into());
        }
        return Ok((None, None));
    }
    let dir = dir.ok_or_else(|| {
        "nbds:// needs tls-certificates=DIR (a directory with ca-cert.pem, and optionally \
         client-cert.pem and client-key.pem)"
            .to_string()
    })?;
    let dir = PathBuf::from(dir);
    if !dir.is_absolute() {
        return Err(format!(
            "tls-certificates={}: give an absolute path",
            dir.display()
        ));
    }
    Ok((Some(dir), host))
}

/// `dev` with the value of any `key=` option replaced by `<redacted>`.
fn redact_key(dev: &str) -> String {
    let Some((head, query)) = dev.split_once('?') else {
        return dev.to_string();
    };
    let opts: Vec<&str> = query
        .split('&')
        .map(|kv| {
            if kv.starts_with("key=") {
                "key=<redacted>"
            } else {
                kv
            }
        })
        .collect();
    format!("{head}?{}", opts.join("&"))
}

/// `POOL/NAME?query` after a Ceph scheme: pool and name decoded, neither empty, one '/'.
fn ceph_body<'a>(rest: &'a str, shape: &str) -> Result<(String, String, Option<&'a str>), String> {
    if rest.starts_with("//") {
        return Err(format!("no '//' after the scheme ({shape})"));
    }
    let (body, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    if body.contains('#') {
        return Err("fragments ('#') have no meaning here".into());
    }
    let (pool, name) = body
        .split_once('/')
        .ok_or_else(|| format!("no pool ({shape})"))?;
    let pool = decode(pool)?;
    let name = decode(name)?;
    if pool.is_empty() || name.is_empty() || name.contains('/') {
        return Err(format!("'{body}' does not match {shape}"));
    }
    Ok((pool, name, query))
}

/// `conf=`, `id=`, `keyring=` (absolute paths); `key=` refused; `connections=` refused.
fn ceph_client(q: &mut Query) -> Result<CephClient, String> {
    if q.take("key").is_some() {
        return Err(
            "a key in the name is refused: put it in a keyring file (mode 0600) and name \
             that with keyring=PATH"
                .into(),
        );
    }
    if q.take("connections").is_some() {
        return Err("connections= has no meaning for Ceph: librados keeps its own".into());
    }
    let path = |q: &mut Query, k: &str| -> Result<Option<PathBuf>, String> {
        match q.take(k) {
            None => Ok(None),
            Some(v) => {
                let p = PathBuf::from(decode(&v)?);
                if !p.is_absolute() {
                    return Err(format!("{k}={}: give an absolute path", p.display()));
                }
                Ok(Some(p))
            }
        }
    };
    let conf = path(q, "conf")?;
    let keyring = path(q, "keyring")?;
    let id = q.take("id").map(|v| decode(&v)).transpose()?;
    if id
        .as_deref()
        .is_some_and(|i| i.is_empty() || i.contains(['=', ' ']))
    {
        return Err("id= must be a client id such as 'admin' (client.admin)".into());
    }
    Ok(CephClient { conf, id, keyring })
}

/// What is left after the options a kind knows: an unknown one is an error.
fn no_more(q: &Query) -> Result<(), String> {
    match q.left() {
        Some(k) => Err(format!("unknown option '{k}'")),
        None => Ok(()),
    }
}

fn parse_rbd(dev: &str, rest: &str) -> Result<NetUri, String> {
    const SHAPE: &str = "rbd:POOL/IMAGE[@SNAP]";
    let (pool, image, query) = ceph_body(rest, SHAPE)?;
    let (image, snap) = match image.split_once('@') {
        Some((i, s)) if !i.is_empty() && !s.is_empty() => (i.to_string(), Some(s.to_string())),
        Some(_) => return Err(format!("empty image or snapshot name ({SHAPE})")),
        None => (image, None),
    };
    let mut q = Query::parse(query)?;
    let client = ceph_client(&mut q)?;
    let opts = net_options(&mut q)?;
    no_more(&q)?;
    Ok(NetUri::Rbd(RbdUri {
        pool,
        image,
        snap,
        client,
        opts,
        text: dev.to_string(),
    }))
}

fn parse_rados(dev: &str, rest: &str) -> Result<NetUri, String> {
    const SHAPE: &str = "rados:POOL/PREFIX?object_size=SIZE&size=SIZE";
    let (pool, prefix, query) = ceph_body(rest, SHAPE)?;
    let mut q = Query::parse(query)?;
    let size_opt = |q: &mut Query, k: &str| -> Result<u64, String> {
        let v = q
            .take(k)
            .ok_or_else(|| format!("no {k}= option ({SHAPE})"))?;
        tables::units::parse_size(&v)
            .map(|b| b.0)
            .map_err(|e| format!("{k}={v}: {e}"))
    };
    let object_size = size_opt(&mut q, "object_size")?;
    if !object_size.is_power_of_two() || !(4096..=128 << 20).contains(&object_size) {
        return Err(format!(
            "object_size={object_size}: give a power of two from 4K to 128M"
        ));
    }
    let size = size_opt(&mut q, "size")?;
    if size == 0 || !size.is_multiple_of(512) {
        return Err(format!(
            "size={size}: give a non-zero multiple of 512 bytes"
        ));
    }
    let client = ceph_client(&mut q)?;
    let opts = net_options(&mut q)?;
    no_more(&q)?;
    Ok(NetUri::Rados(RadosUri {
        pool,
        prefix,
        object_size,
        size,
        client,
        opts,
        text: dev.to_string(),
    }))
}

fn net_options(q: &mut Query) -> Result<NetOptions, String> {
    let mut o = NetOptions::default();
    if let Some(v) = q.take("timeout") {
        o.timeout = seconds("timeout", &v, 0.01)?;
    }
    if let Some(v) = q.take("reconnect-delay") {
        o.reconnect_delay = seconds("reconnect-delay", &v, 0.0)?;
    }
    if let Some(v) = q.take("connect-timeout") {
        o.connect_timeout = seconds("connect-timeout", &v, 0.01)?;
    }
    if let Some(v) = q.take("connections") {
        o.connections = match v.parse::<u8>() {
            Ok(n) if (1..=16).contains(&n) => n,
            _ => return Err(format!("connections={v}: give a number from 1 to 16")),
        };
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbd(s: &str) -> NbdUri {
        match NetUri::parse(s).unwrap() {
            NetUri::Nbd(u) => u,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn nbd_tcp() {
        let u = nbd("nbd://127.0.0.1/disk");
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 10809
            }
        );
        assert_eq!(u.export, "disk");
        assert!(!u.tls);
        let u = nbd(
            "nbds://[::1]:1234/a%2Fb?timeout=2.5&reconnect-delay=0&connections=4&tls-certificates=/p",
        );
        assert_eq!(
            u.addr,
            NbdAddr::Tcp {
                host: "::1".into(),
                port: 1234
            }
        );
        assert_eq!(u.export, "a/b");
        assert!(u.tls);
        assert_eq!(u.opts.timeout, Duration::from_millis(2500));
        assert_eq!(u.opts.reconnect_delay, Duration::ZERO);
        assert_eq!(u.opts.connections, 4);
        assert_eq!(nbd("nbd://host").export, "");
        assert_eq!(u.tls_certificates, Some(PathBuf::from("/p")));
        assert_eq!(
            u.to_string(),
            "nbds://[::1]:1234/a%2Fb?timeout=2.5&reconnect-delay=0&connections=4&tls-certificates=/p"
        );
    }

    #[test]
    fn nbd_unix() {
        let u = nbd("nbd+unix:///vg/lv?socket=/run/x.sock");
        assert_eq!(u.addr, NbdAddr::Unix("/run/x.sock".into()));
        assert_eq!(u.export, "vg/lv");
    }

    #[test]
    fn iscsi() {
        let NetUri::Iscsi(u) = NetUri::parse(
            "iscsi://admin@10.0.0.1:3261/iqn.2026-12.org.example:disk1/3?chap-secret-file=/etc/s",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(u.user.as_deref(), Some("admin"));
        assert_eq!(u.port, 3261);
        assert_eq!(u.target, "iqn.2026-12.org.example:disk1");
        assert_eq!(u.lun, 3);
    }

    #[test]
    fn refusals_name_the_problem() {
        for (s, want) in [
            ("nbd:///x", "no host"),
            ("nbd://h:0/x", "port '0'"),
            ("nbd://h:99999/x", "port"),
            ("nbd://h/x?timeout=abc", "timeout=abc"),
            ("nbd://h/x?bogus=1", "unknown option 'bogus'"),
            ("nbd://h/x?timeout=1&timeout=2", "twice"),
            ("nbd://h/x?connections=0", "connections=0"),
            ("nbd://u@h/x", "no user"),
            ("nbd+unix://h/x?socket=/s", "no host"),
            ("nbd+unix:///x", "socket=PATH"),
            ("nbd+unix:///x?socket=rel", "absolute"),
            ("iscsi://u:pw@h/iqn.x/0", "password"),
            ("iscsi://u%3Apw@h/iqn.x/0", "password"),
            ("iscsi://h/iqn.x", "LUN"),
            ("iscsi://h/iqn.x/99999", "LUN '99999'"),
            ("iscsi://u@h/iqn.x/0", "chap-secret-file"),
            ("nbd://h/%zz", "percent"),
            ("ftp://h/x", "unknown scheme"),
            ("nbds://h/x", "tls-certificates=DIR"),
            ("nbds://h/x?tls-certificates=rel", "absolute"),
            ("nbd://h/x?tls-certificates=/p", "nbds://"),
            ("rbd:img", "no pool"),
            ("rbd://rbd/img", "'//'"),
            ("rbd:rbd/", "does not match"),
            ("rbd:/img", "does not match"),
            ("rbd:rbd/a/b", "does not match"),
            ("rbd:rbd/img@", "empty image or snapshot"),
            ("rbd:rbd/img?key=AQBsecret", "keyring file"),
            ("rbd:rbd/img?keyring=rel/k", "absolute"),
            ("rbd:rbd/img?conf=ceph.conf", "absolute"),
            ("rbd:rbd/img?connections=2", "connections="),
            ("rbd:rbd/img?bogus=1", "unknown option 'bogus'"),
            ("rbd:rbd/img?timeout=x", "timeout=x"),
            ("rados:p/v?size=1G", "no object_size="),
            ("rados:p/v?object_size=4M", "no size="),
            ("rados:p/v?object_size=3M&size=1G", "power of two"),
            ("rados:p/v?object_size=1G&size=1G", "power of two"),
            ("rados:p/v?object_size=4M&size=1000", "multiple of 512"),
            ("rados:p/v?object_size=4M&size=1Q", "size=1Q"),
            ("rados:p/v?object_size=4M&size=1G&key=x", "keyring file"),
        ] {
            let e = NetUri::parse(s).unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(e.starts_with(&redact_key(s)), "{s}: {e}");
        }
    }

    #[test]
    fn a_key_in_a_ceph_name_is_never_shown() {
        for s in [
            "rbd:rbd/img?key=AQBs3cr3t==",
            "rbd:rbd/img?id=a&key=AQBs3cr3t==&timeout=1",
            "rados:p/v?object_size=4M&size=1G&key=AQBs3cr3t==",
        ] {
            let e = NetUri::parse(s).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("s3cr3t"), "{shown}");
            assert!(
                shown.contains("key=<redacted>") && shown.contains("keyring"),
                "{shown}"
            );
        }
    }

    #[test]
    fn rbd_and_rados() {
        let NetUri::Rbd(u) = NetUri::parse(
            "rbd:rbd/base@s1?conf=/etc/ceph/x.conf&id=vol&keyring=/etc/ceph/k&reconnect-delay=5",
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!((u.pool.as_str(), u.image.as_str()), ("rbd", "base"));
        assert_eq!(u.snap.as_deref(), Some("s1"));
        assert_eq!(u.client.conf, Some(PathBuf::from("/etc/ceph/x.conf")));
        assert_eq!(u.client.id.as_deref(), Some("vol"));
        assert_eq!(u.client.keyring, Some(PathBuf::from("/etc/ceph/k")));
        assert_eq!(u.opts.reconnect_delay, Duration::from_secs(5));
        let NetUri::Rbd(u) = NetUri::parse("rbd:p%2Fx/img").unwrap() else {
            panic!()
        };
        assert_eq!((u.pool.as_str(), u.snap), ("p/x", None));
        assert_eq!(u.client, CephClient::default());

        let NetUri::Rados(u) =
            NetUri::parse("rados:data/vol1?object_size=4M&size=1.5G&timeout=3").unwrap()
        else {
            panic!()
        };
        assert_eq!((u.pool.as_str(), u.prefix.as_str()), ("data", "vol1"));
        assert_eq!((u.object_size, u.size), (4 << 20, 3 << 29));
        assert_eq!(u.opts.timeout, Duration::from_secs(3));
        assert_eq!(u.object_name(0x2a), "vol1.000000000000002a");
        assert_eq!(
            u.to_string(),
            "rados:data/vol1?object_size=4M&size=1.5G&timeout=3"
        );
    }

    #[test]
    fn is_network() {
        assert!(NetUri::is_network("rbd:rbd/img"));
        assert!(NetUri::is_network("rados:p/x?size=1G"));
        assert!(NetUri::is_network("nbd://x/y"));
        assert!(NetUri::is_network("iscsi://x/y/0"));
        assert!(!NetUri::is_network("/dev/sda"));
        assert!(!NetUri::is_network("nbd:x"));
    }
}
