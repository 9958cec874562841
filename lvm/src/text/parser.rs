//! Text to tree, following libdevmapper's parser (`_file`, `_section`, `_value`, `_type`).
//!
//! Stricter than LVM2 where LVM2 would silently read something else: a malformed number
//! (`-`, `08`) or one that does not fit 64 bits is an error (LVM2 reads 0 or fails), a key with
//! `/` is refused (LVM2 would make it a path of nested sections), and nesting is bounded.

use super::lexer::{Lexer, Tok};
use super::{Item, Section, TextError, Value};

/// Deepest nesting of sections accepted (VG metadata uses 4).
pub const MAX_DEPTH: usize = 32;

/// Parses LVM config text (metadata as stored on disk, a `vgcfgbackup` file). The text ends at
/// its first NUL byte, if any, as it does for LVM2. It must be UTF-8.
pub fn parse(text: &[u8]) -> Result<Section, TextError> {
    let text = match text.iter().position(|&b| b == 0) {
        Some(n) => &text[..n],
        None => text,
    };
    let text = std::str::from_utf8(text).map_err(|e| {
        let at = e.valid_up_to();
        // A lexer over the valid prefix locates the byte.
        let valid = std::str::from_utf8(&text[..at]).unwrap_or_default();
        Lexer::new(valid).error_at(at, "text is not valid UTF-8")
    })?;
    let mut p = Parser {
        lex: Lexer::new(text),
        tok: Tok::Eof,
        at: 0,
    };
    p.advance()?;
    let mut root = Section::new();
    while p.tok != Tok::Eof {
        p.entry(&mut root, 0)?;
    }
    Ok(root)
}

struct Parser<'a> {
    lex: Lexer<'a>,
    tok: Tok<'a>,
    at: usize,
}

/// Undoes `\"` and `\\` (`dm_unescape_double_quotes`); any other backslash stays.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            if let Some(&n) = it.peek() {
                if n == '"' || n == '\\' {
                    out.push(n);
                    it.next();
                    continue;
                }
            }
        }
        out.push(c);
    }
    out
}

/// An integer as `strtoll(s, NULL, 0)` reads what the lexer hands it (sign, digits; a leading
/// 0 means octal), refusing what strtoll would read as something else or not at all.
fn int_value(s: &str) -> Option<i64> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() {
        return None;
    }
    let radix = if digits.len() > 1 && digits.starts_with('0') {
        8
    } else {
        10
    };
    // Parse the magnitude as u64 so that i64::MIN reads.
    let mag = u64::from_str_radix(digits, radix).ok()?;
    if neg {
        0i64.checked_sub_unsigned(mag)
    } else {
        i64::try_from(mag).ok()
    }
}

impl<'a> Parser<'a> {
    fn advance(&mut self) -> Result<(), TextError> {
        let (t, at) = self.lex.next_token()?;
        self.tok = t;
        self.at = at;
        Ok(())
    }

    fn error(&self, message: impl Into<String>) -> TextError {
        self.lex.error_at(self.at, message)
    }

    fn expect(&mut self, want: Tok<'static>, what: &str) -> Result<(), TextError> {
        if self.tok != want {
            return Err(self.error(format!("expected {what}, found {}", self.tok.describe())));
        }
        self.advance()
    }

    /// `key { entry* }` or `key = value`, appended to `parent`.
    fn entry(&mut self, parent: &mut Section, depth: usize) -> Result<(), TextError> {
        let key = match self.tok {
            Tok::Ident(s) => s.to_string(),
            Tok::Escaped(s) => unescape(s),
            Tok::Single(s) => s.to_string(),
            _ => return Err(self.error(format!("expected a key, found {}", self.tok.describe()))),
        };
        if key.is_empty() {
            return Err(self.error("empty key"));
        }
        if key.contains('/') {
            // LVM2 would read `a/b` as `b` inside a section `a`.
            return Err(self.error(format!("key '{key}' contains '/'")));
        }
        self.advance()?;
        match self.tok {
            Tok::SectionB => {
                if depth >= MAX_DEPTH {
                    return Err(
                        self.error(format!("sections nested deeper than {MAX_DEPTH} levels"))
                    );
                }
                self.advance()?;
                let mut s = Section::new();
                while self.tok != Tok::SectionE {
                    if self.tok == Tok::Eof {
                        return Err(self.error(format!("section '{key}' not closed")));
                    }
                    self.entry(&mut s, depth + 1)?;
                }
                self.advance()?;
                parent.push(key, Item::Section(s));
            }
            Tok::Eq => {
                self.advance()?;
                let item = self.value()?;
                parent.push(key, item);
            }
            _ => {
                return Err(self.error(format!(
                    "expected '=' or '{{' after '{key}', found {}",
                    self.tok.describe()
                )))
            }
        }
        Ok(())
    }

    /// `[ scalar (,? scalar)* ]` or a scalar.
    fn value(&mut self) -> Result<Item, TextError> {
        if self.tok != Tok::ArrayB {
            return Ok(Item::Value(self.scalar()?));
        }
        self.advance()?;
        let mut items = Vec::new();
        while self.tok != Tok::ArrayE {
            items.push(self.scalar()?);
            if self.tok == Tok::Comma {
                self.advance()?;
            }
        }
        self.expect(Tok::ArrayE, "']'")?;
        Ok(Item::Array(items))
    }

    fn scalar(&mut self) -> Result<Value, TextError> {
        let v = match self.tok {
            Tok::Int(s) => {
                Value::Int(int_value(s).ok_or_else(|| self.error(format!("bad integer '{s}'")))?)
            }
            Tok::Float(s) => {
                if s.parse::<f64>().is_err() {
                    return Err(self.error(format!("bad number '{s}'")));
                }
                Value::Float(s.to_string())
            }
            Tok::Escaped(s) => Value::Str(unescape(s)),
            Tok::Single(s) | Tok::Bare(s) => Value::Str(s.to_string()),
            _ => return Err(self.error(format!("expected a value, found {}", self.tok.describe()))),
        };
        self.advance()?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_small_file() {
        let t = parse(
            b"# c\nvg {\n\tid = \"a\\\"b\\\\c\\d\"\n\tn = -3\n\tl = [\"x\" 'y', 2,]\n\te = []\n\
              \tsub { f = 1.5 }\n}\nversion = 010\0garbage",
        )
        .unwrap();
        let Some(Item::Section(vg)) = t.get("vg") else {
            panic!("{t:?}")
        };
        assert_eq!(
            vg.get("id"),
            Some(&Item::Value(Value::Str("a\"b\\c\\d".into())))
        );
        assert_eq!(vg.get("n"), Some(&Item::Value(Value::Int(-3))));
        assert_eq!(
            vg.get("l"),
            Some(&Item::Array(vec![
                Value::Str("x".into()),
                Value::Str("y".into()),
                Value::Int(2)
            ]))
        );
        assert_eq!(vg.get("e"), Some(&Item::Array(vec![])));
        assert_eq!(t.get("version"), Some(&Item::Value(Value::Int(8))));
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = parse(b"a {\n  b = 1\n  c 2\n}").unwrap_err();
        assert_eq!((e.line, e.column), (3, 5), "{e}");
        let e = parse(b"a = 99999999999999999999").unwrap_err();
        assert!(e.message.contains("bad integer"), "{e}");
        let e = parse(b"a = -").unwrap_err();
        assert!(e.message.contains("bad integer"), "{e}");
        let e = parse(b"a = 09").unwrap_err();
        assert!(e.message.contains("bad integer"), "{e}");
        assert!(parse(b"a { b = 1").is_err());
        assert!(parse(b"a/b = 1").is_err());
        assert!(parse(b"a = [1, [2]]").is_err());
        let deep = "a {".repeat(100);
        assert!(parse(deep.as_bytes())
            .unwrap_err()
            .message
            .contains("nested"));
    }

    #[test]
    fn int_limits() {
        assert_eq!(int_value("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(int_value("9223372036854775807"), Some(i64::MAX));
        assert_eq!(int_value("9223372036854775808"), None);
        assert_eq!(int_value("+7"), Some(7));
        assert_eq!(int_value("0"), Some(0));
    }
}
