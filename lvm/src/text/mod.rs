//! LVM's configuration text format (libdevmapper's `libdm-config.c`), which the VG metadata
//! is written in, as a small tree: [`lexer`] (tokens, as LVM2 splits them), [`parser`] (text
//! to [`Section`]) and [`writer`] (back to text LVM2 reads).
//!
//! The grammar: a file is a list of entries; an entry is `key = value` or `key { entries }`;
//! a value is an integer, a float, a string (`"..."` with `\"` and `\\` escapes, `'...'`
//! without escapes, or a bare word), or an array `[v, v, ...]` of those (a comma may be left out after a quoted string, and may end
//! the list).
//! `#` starts a comment to the end of the line. A NUL ends the text (the on-disk copy of the
//! metadata ends with one).
//!
//! The tree keeps entries in order and keeps duplicates, so what was read is written back
//! unchanged; [`crate::model`] decides what duplicate keys mean.

pub mod lexer;
pub mod parser;
pub mod writer;

pub use parser::parse;
pub use writer::{write, Style};

/// A scalar value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// An integer (LVM2 reads them as `int64_t`).
    Int(i64),
    /// A float, kept as its text (LVM2 never writes floats in VG metadata; this keeps any
    /// that appear exactly as they were).
    Float(String),
    /// A string (quoted or bare in the text; always written quoted).
    Str(String),
}

/// What a key holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// `key = value`
    Value(Value),
    /// `key = [v, ...]` (possibly empty; `[x]` stays an array of one).
    Array(Vec<Value>),
    /// `key { ... }`
    Section(Section),
}

/// An ordered list of entries: a section's contents, or a whole file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Section {
    /// The entries, in text order, duplicates kept.
    pub entries: Vec<(String, Item)>,
}

/// A parse or write error, with the line and column (1-based, in bytes) where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct TextError {
    /// Line number.
    pub line: usize,
    /// Column in bytes.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl Section {
    /// An empty section.
    pub fn new() -> Section {
        Section::default()
    }

    /// Appends an entry.
    pub fn push(&mut self, key: impl Into<String>, item: Item) {
        self.entries.push((key.into(), item));
    }

    /// Appends `key = value`.
    pub fn push_value(&mut self, key: impl Into<String>, v: Value) {
        self.push(key, Item::Value(v));
    }

    /// Appends `key = "s"`.
    pub fn push_str(&mut self, key: impl Into<String>, s: impl Into<String>) {
        self.push_value(key, Value::Str(s.into()));
    }

    /// Appends `key = n`.
    pub fn push_int(&mut self, key: impl Into<String>, n: i64) {
        self.push_value(key, Value::Int(n));
    }

    /// The first entry named `key`.
    pub fn get(&self, key: &str) -> Option<&Item> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// How many entries are named `key`.
    pub fn count(&self, key: &str) -> usize {
        self.entries.iter().filter(|(k, _)| k == key).count()
    }
}
