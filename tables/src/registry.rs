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
