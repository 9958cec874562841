//! Tree to text that LVM2's parser reads back to the same tree.
//!
//! Two layouts, as LVM2 writes them: [`Style::Disk`] (the copy in a metadata area: no
//! indentation) and [`Style::File`] (a `vgcfgbackup` file: tab-indented). Strings are always
//! double-quoted with `"` and `\` escaped; keys are written bare unless LVM2's lexer would split
//! or misread them, then quoted.

use super::lexer::is_space;
use super::{Item, Section, TextError, Value};

/// Layout of the written text.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Style {
    /// No indentation (LVM2's on-disk copies).
    Disk,
    /// One tab per level (LVM2's backup and archive files).
    File,
}

/// Writes `root` as LVM config text. Fails (naming the key path) on what LVM2 could not read
/// back as written: an empty key, a key with `/`, a NUL in a key or string, a float whose
/// text is not a float literal.
pub fn write(root: &Section, style: Style) -> Result<String, TextError> {
    let mut out = String::new();
    let mut path = Vec::new();
    section(&mut out, root, style, 0, &mut path)?;
    Ok(out)
}

fn err(path: &[&str], message: impl Into<String>) -> TextError {
    TextError {
        line: 0,
        column: 0,
        message: format!("{}: {}", path.join("/"), message.into()),
    }
}

/// Whether `key` lexes back as one identifier token.
fn bare_key(key: &str) -> bool {
    let b = key.as_bytes();
    !b.is_empty()
        && !matches!(b[0], b'[' | b']' | b',' | b'"' | b'\'')
        && !b
            .iter()
            .any(|&c| is_space(c) || matches!(c, b'#' | b'=' | b'{' | b'}' | b'!' | b'"'))
}

fn quoted(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        if c == '"' || c == '\\' {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    q
}

/// Whether `s` lexes as one float token that reads as a number.
fn float_literal(s: &str) -> bool {
    let body = s.strip_prefix(['+', '-']).unwrap_or(s);
    body.bytes().filter(|&c| c == b'.').count() == 1
        && body.bytes().all(|c| c.is_ascii_digit() || c == b'.')
        && body.bytes().any(|c| c.is_ascii_digit())
}

fn scalar(out: &mut String, v: &Value, path: &[&str]) -> Result<(), TextError> {
    match v {
        Value::Int(n) => out.push_str(&n.to_string()),
        Value::Float(s) => {
            if !float_literal(s) {
                return Err(err(path, format!("'{s}' is not a float literal")));
            }
            out.push_str(s)
        }
        Value::Str(s) => {
            if s.contains('\0') {
                return Err(err(path, "string contains NUL"));
            }
            out.push_str(&quoted(s))
        }
    }
    Ok(())
}

fn section<'a>(
    out: &mut String,
    s: &'a Section,
    style: Style,
    depth: usize,
    path: &mut Vec<&'a str>,
) -> Result<(), TextError> {
    let indent = match style {
        Style::Disk => String::new(),
        Style::File => "\t".repeat(depth),
    };
    for (key, item) in &s.entries {
        path.push(key);
        if key.is_empty() || key.contains('/') || key.contains('\0') {
            return Err(err(path, "key is empty or contains '/' or NUL"));
        }
        out.push_str(&indent);
        if bare_key(key) {
            out.push_str(key);
        } else {
            out.push_str(&quoted(key));
        }
        match item {
            Item::Value(v) => {
                out.push_str(" = ");
                scalar(out, v, path)?;
                out.push('\n');
            }
            Item::Array(vs) => {
                out.push_str(" = [");
                for (i, v) in vs.iter().enumerate() {
                    if i > 0 {
                        out.push_str(", ");
                    }
                    scalar(out, v, path)?;
                }
                out.push_str("]\n");
            }
            Item::Section(sub) => {
                out.push_str(" {\n");
                section(out, sub, style, depth + 1, path)?;
                out.push_str(&indent);
                out.push_str("}\n");
            }
        }
        path.pop();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    #[test]
    fn odd_keys_and_strings_round_trip() {
        let mut inner = Section::new();
        inner.push_str("a b", "x\"y\\z\n");
        inner.push_str("#k", "");
        inner.push_str("[k", "'");
        inner.push_value("f", Value::Float("-0.5".into()));
        inner.push("e", Item::Array(vec![]));
        inner.push("one", Item::Array(vec![Value::Int(i64::MIN)]));
        let mut root = Section::new();
        root.push("vg", Item::Section(inner));
        root.push_int("version", 1);
        for style in [Style::Disk, Style::File] {
            let text = write(&root, style).unwrap();
            assert_eq!(parse(text.as_bytes()).unwrap(), root, "{text}");
        }
    }

    #[test]
    fn unwritable_trees_are_refused() {
        let mut root = Section::new();
        root.push_str("a/b", "x");
        assert!(write(&root, Style::Disk).is_err());
        let mut root = Section::new();
        root.push_value("f", Value::Float("1e5".into()));
        assert!(write(&root, Style::Disk).is_err());
        let mut root = Section::new();
        root.push_str("s", "a\0b");
        assert!(write(&root, Style::Disk)
            .unwrap_err()
            .message
            .starts_with("s:"));
    }
}
