//! Reading typed fields out of a [`Section`] with errors that name the key path, and keeping
//! every entry not read as "extra" so nothing LVM2 wrote is lost on a round trip.

use tables::Sectors;

use super::ModelError;
use crate::text::{Item, Section, Value};
use crate::units::Extents;
use crate::uuid::Uuid;

/// A section being read: which entries were taken, and the path for messages.
pub(crate) struct Reader<'a> {
    path: String,
    section: &'a Section,
    taken: Vec<bool>,
}

impl<'a> Reader<'a> {
    pub fn new(path: impl Into<String>, section: &'a Section) -> Reader<'a> {
        Reader {
            path: path.into(),
            section,
            taken: vec![false; section.entries.len()],
        }
    }

    /// An error about `key` of this section.
    pub fn err(&self, key: &str, problem: impl Into<String>) -> ModelError {
        ModelError {
            path: format!("{}/{key}", self.path),
            problem: problem.into(),
        }
    }

    /// Takes the entry `key`; a second entry with that key is an error (LVM2 would warn and
    /// use one of them, we do not guess which).
    pub fn take(&mut self, key: &str) -> Result<Option<&'a Item>, ModelError> {
        let mut found = None;
        for (i, (k, item)) in self.section.entries.iter().enumerate() {
            if k == key {
                if found.is_some() {
                    return Err(self.err(key, "appears more than once"));
                }
                self.taken[i] = true;
                found = Some(item);
            }
        }
        Ok(found)
    }

    fn required(&mut self, key: &str) -> Result<&'a Item, ModelError> {
        self.take(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn int_of(&self, key: &str, item: &Item) -> Result<i64, ModelError> {
        match item {
            Item::Value(Value::Int(n)) => Ok(*n),
            _ => Err(self.err(key, "is not an integer")),
        }
    }

    pub fn u64(&mut self, key: &str) -> Result<u64, ModelError> {
        let item = self.required(key)?;
        let n = self.int_of(key, item)?;
        u64::try_from(n).map_err(|_| self.err(key, format!("{n} is negative")))
    }

    pub fn opt_u64(&mut self, key: &str) -> Result<Option<u64>, ModelError> {
        match self.take(key)? {
            None => Ok(None),
            Some(item) => {
                let n = self.int_of(key, item)?;
                u64::try_from(n)
                    .map(Some)
                    .map_err(|_| self.err(key, format!("{n} is negative")))
            }
        }
    }

    fn to_u32(&self, key: &str, n: u64) -> Result<u32, ModelError> {
        u32::try_from(n).map_err(|_| self.err(key, format!("{n} does not fit 32 bits")))
    }

    pub fn u32(&mut self, key: &str) -> Result<u32, ModelError> {
        let n = self.u64(key)?;
        self.to_u32(key, n)
    }

    pub fn opt_u32(&mut self, key: &str) -> Result<Option<u32>, ModelError> {
        match self.opt_u64(key)? {
            None => Ok(None),
            Some(n) => self.to_u32(key, n).map(Some),
        }
    }

    pub fn sectors(&mut self, key: &str) -> Result<Sectors, ModelError> {
        self.u64(key).map(Sectors)
    }

    pub fn extents(&mut self, key: &str) -> Result<Extents, ModelError> {
        self.u32(key).map(Extents)
    }

    pub fn opt_str(&mut self, key: &str) -> Result<Option<String>, ModelError> {
        match self.take(key)? {
            None => Ok(None),
            Some(Item::Value(Value::Str(s))) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(key, "is not a string")),
        }
    }

    pub fn str(&mut self, key: &str) -> Result<String, ModelError> {
        self.opt_str(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub fn uuid(&mut self, key: &str) -> Result<Uuid, ModelError> {
        let s = self.str(key)?;
        s.parse().map_err(|e| self.err(key, format!("{e}")))
    }

    /// A list of flag names (LVM2 also accepts a single string).
    pub fn opt_flags(&mut self, key: &str) -> Result<Option<Flags>, ModelError> {
        let vs: &[Value] = match self.take(key)? {
            None => return Ok(None),
            Some(Item::Array(vs)) => vs,
            Some(Item::Value(v)) => std::slice::from_ref(v),
            Some(Item::Section(_)) => return Err(self.err(key, "is a section, not a list")),
        };
        vs.iter()
            .map(|v| match v {
                Value::Str(s) => Ok(s.clone()),
                _ => Err(self.err(key, "has an item that is not a string")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|f| Some(Flags(f)))
    }

    pub fn flags(&mut self, key: &str) -> Result<Flags, ModelError> {
        self.opt_flags(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub fn opt_section(&mut self, key: &str) -> Result<Option<&'a Section>, ModelError> {
        match self.take(key)? {
            None => Ok(None),
            Some(Item::Section(s)) => Ok(Some(s)),
            Some(_) => Err(self.err(key, "is not a section")),
        }
    }

    pub fn array(&mut self, key: &str) -> Result<&'a [Value], ModelError> {
        match self.required(key)? {
            Item::Array(vs) => Ok(vs),
            Item::Value(v) => Ok(std::slice::from_ref(v)),
            Item::Section(_) => Err(self.err(key, "is a section, not a list")),
        }
    }

    /// The entries not taken, in order.
    pub fn rest(self) -> Vec<(String, Item)> {
        self.section
            .entries
            .iter()
            .zip(self.taken)
            .filter(|(_, t)| !t)
            .map(|(e, _)| e.clone())
            .collect()
    }
}

/// Reads every entry of `s` (a `physical_volumes` or `logical_volumes` section at `path`) as
/// a subsection with `f(path, key, subsection)`.
pub(crate) fn subsections<T>(
    path: &str,
    s: &Section,
    f: impl Fn(&str, &str, &Section) -> Result<T, ModelError>,
) -> Result<Vec<T>, ModelError> {
    s.entries
        .iter()
        .map(|(k, item)| match item {
            Item::Section(sub) => f(path, k, sub),
            _ => Err(ModelError {
                path: format!("{path}/{k}"),
                problem: "is not a section".into(),
            }),
        })
        .collect()
}

/// Status or compatibility flags (`status = ["READ", "WRITE"]`), kept as LVM2 wrote them,
/// unknown ones included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags(pub Vec<String>);

impl Flags {
    /// Flags from names.
    pub fn of(names: &[&str]) -> Flags {
        Flags(names.iter().map(|s| s.to_string()).collect())
    }

    /// Whether `name` is set.
    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|f| f == name)
    }

    /// Sets `name` (appended if not there).
    pub fn set(&mut self, name: &str) {
        if !self.has(name) {
            self.0.push(name.to_string());
        }
    }

    /// Clears `name`.
    pub fn clear(&mut self, name: &str) {
        self.0.retain(|f| f != name);
    }

    pub(crate) fn item(&self) -> Item {
        Item::Array(self.0.iter().map(|s| Value::Str(s.clone())).collect())
    }
}

/// A `u64` as a text integer; values past `i64::MAX` cannot be written (LVM2 reads integers
/// as `int64_t`).
pub(crate) fn int(path: &str, key: &str, n: u64) -> Result<Value, ModelError> {
    i64::try_from(n).map(Value::Int).map_err(|_| ModelError {
        path: format!("{path}/{key}"),
        problem: format!("{n} is too large for LVM's text format"),
    })
}

/// Whether `name` is a valid VG or LV name (`validate_name`): 1 to 127 characters of
/// `a-zA-Z0-9+_.-`, not starting with `-`, not `.` or `..`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 128
        && !name.starts_with('-')
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'_' | b'.' | b'-'))
}
