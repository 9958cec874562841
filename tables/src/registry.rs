//! Target kinds and how a parsed table becomes a device.
//!
//! Each target type (`linear`, `striped`, ..., and from other crates `raid`, `thin-pool`,
//! `thin`) is a [`TargetKind`] registered in a [`Registry`] by name. A kind validates its
//! argument list (so `table check` reports argument errors without opening anything) and builds
//! a device for one segment, opening the devices its arguments name through a [`Resolver`].

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::io::DeviceRef;
use crate::units::Sectors;

/// Opens the devices that table lines name. The file-extent resolver opens paths; the volume
/// daemon's resolver also knows its own named devices, so tables can stack.
pub trait Resolver {
    /// Opens `dev` (a path, or a name the resolver knows). The error is a human sentence.
    fn open(&self, dev: &str) -> Result<DeviceRef, String>;

    /// How a remote extent this resolver opened is doing (connections, errors), for status
    /// reports; `None` for local devices and names it does not have open.
    fn extent_health(&self, dev: &str) -> Option<ExtentHealth> {
        let _ = dev;
        None
    }

    /// Whether `dev` names a remote extent this resolver opens (`Some`, with whether the
    /// name is well formed: the error says what is wrong), rather than a path. Checked
    /// without connecting.
    fn check_remote(&self, dev: &str) -> Option<Result<(), String>> {
        let _ = dev;
        None
    }
}

/// The health of a remote extent (an NBD export, an iSCSI LUN), as `dev status` and
/// `dev list --json` show it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExtentHealth {
    /// `up`, `degraded` (some connections down), `connecting`, `reconnecting`, or `failed`
    /// (no connection for longer than reconnect-delay: requests fail with EIO).
    pub state: String,
    /// The server (`host:port` or `unix:PATH`).
    pub server: String,
    /// Connections up.
    pub connections_up: u32,
    /// Connections in use.
    pub connections: u32,
    /// Requests waiting for an answer.
    pub inflight: u64,
    /// Reconnections so far.
    pub reconnects: u64,
    /// Requests that ran past their timeout.
    pub timeouts: u64,
    /// Connections dropped for misbehaving (protocol violations, stalls).
    pub dropped: u64,
    /// Smoothed round-trip time, microseconds.
    pub rtt_us: u64,
    /// The last connection error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

impl ExtentHealth {
    /// One status line for extent `name`.
    pub fn line(&self, name: &str) -> String {
        let mut s = format!(
            "{name} {} server {} connections {}/{} inflight {} reconnects {} timeouts {} \
             dropped {} rtt {}us",
            self.state,
            self.server,
            self.connections_up,
            self.connections,
            self.inflight,
            self.reconnects,
            self.timeouts,
            self.dropped,
            self.rtt_us
        );
        if let Some(e) = &self.last_error {
            s.push_str(&format!(" last-error \"{}\"", e.replace('"', "'")));
        }
        s
    }
}

impl<F: Fn(&str) -> Result<DeviceRef, String>> Resolver for F {
    fn open(&self, dev: &str) -> Result<DeviceRef, String> {
        self(dev)
    }
}

/// Why a target's arguments are wrong: which argument (1-based index into the target's
/// arguments, so field = 3 + arg for the whole line) and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{msg}", arg.map(|a| format!("argument {a}: ")).unwrap_or_default())]
pub struct ArgError {
    /// 1-based index of the offending argument, or `None` for the argument list as a whole.
    pub arg: Option<usize>,
    /// What is wrong.
    pub msg: String,
}

impl ArgError {
    /// Error about argument `arg` (1-based).
    pub fn at(arg: usize, msg: impl Into<String>) -> ArgError {
        ArgError {
            arg: Some(arg),
            msg: msg.into(),
        }
    }
    /// Error about the argument list as a whole (wrong count...).
    pub fn whole(msg: impl Into<String>) -> ArgError {
        ArgError {
            arg: None,
            msg: msg.into(),
        }
    }
}

/// What a kind gets to build one segment.
pub struct BuildCtx<'a> {
    /// 1-based line of the table text (0 if built programmatically).
    pub line: usize,
    /// Segment length.
    pub len: Sectors,
    /// Opens the devices named in the arguments.
    pub resolver: &'a dyn Resolver,
}

/// One target type.
pub trait TargetKind: Send + Sync {
    /// Name as written in tables (`linear`).
    fn name(&self) -> &'static str;
    /// Validates the arguments without opening anything; `len` is the segment length.
    fn validate(&self, len: Sectors, args: &[String]) -> Result<(), ArgError>;
    /// Rewrites the arguments into their canonical printed form (as `dmsetup table` would
    /// print them). Called only on arguments that passed `validate`.
    fn normalize(&self, args: &[String]) -> Vec<String> {
        args.to_vec()
    }
    /// Human name of argument `arg` (1-based) for error messages (`chunk size`), given the
    /// whole argument list (names may depend on earlier arguments). `None` if unknown.
    fn arg_name(&self, args: &[String], arg: usize) -> Option<String> {
        let _ = (args, arg);
        None
    }
    /// Which arguments name devices (0-based indices into `args`), in the order the target
    /// opens them. The daemon uses this to see how tables stack (and refuse cycles), the CLI to
    /// make relative paths absolute before a table leaves it. Called only on arguments that
    /// passed `validate`; a `-` placeholder (a missing device) is not listed.
    fn device_args(&self, args: &[String]) -> Vec<usize>;
    /// The arguments with the devices at `gone` (indices as [`device_args`](Self::device_args)
    /// gives them) left out, when the target can run without them: a raid leg becomes `- -`,
    /// as dm-raid writes a missing leg. `None` (the default) when it cannot. The daemon uses
    /// this when a device a table names could not be brought back at start (its host is
    /// down): the array comes up degraded instead of not at all.
    fn without_devices(&self, args: &[String], gone: &[usize]) -> Option<Vec<String>> {
        let _ = (args, gone);
        None
    }
    /// Builds the device for one segment of `ctx.len` sectors.
    fn build(&self, ctx: &BuildCtx<'_>, args: &[String]) -> Result<DeviceRef, ArgError>;
}

/// Target kinds by name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn TargetKind>>,
}

impl Registry {
    /// An empty registry.
    pub fn empty() -> Registry {
        Registry::default()
    }
    /// Adds (or replaces) a kind.
    pub fn register(&mut self, kind: Arc<dyn TargetKind>) -> &mut Registry {
        self.kinds.insert(kind.name(), kind);
        self
    }
    /// Looks a kind up by name.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn TargetKind>> {
        self.kinds.get(name)
    }
    /// Names of all registered kinds, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        self.kinds.keys().copied().collect()
    }
}
