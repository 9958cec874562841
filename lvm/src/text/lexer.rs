//! Tokens of LVM's config text, split as libdevmapper's `_get_token` splits them.
//!
//! Whether a token starting with a digit, `+`, `-` or `.` is a number depends on the token
//! before it: after `=`, `[` or `,` it is (a value); elsewhere it is part of an identifier
//! (a key). Identifiers run until whitespace, `#`, `=`, `{` or `}`.

use super::TextError;

/// A token kind, with its text where it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tok<'a> {
    /// An integer literal (digits with an optional sign).
    Int(&'a str),
    /// A float literal (digits with one `.`).
    Float(&'a str),
    /// `"..."`: the text between the quotes, escapes not yet undone.
    Escaped(&'a str),
    /// `'...'`: the text between the quotes (no escapes).
    Single(&'a str),
    /// A bare word in value position.
    Bare(&'a str),
    /// A bare word in key position.
    Ident(&'a str),
    /// `=`
    Eq,
    /// `{`
    SectionB,
    /// `}`
    SectionE,
    /// `[`
    ArrayB,
    /// `]`
    ArrayE,
    /// `,`
    Comma,
    /// End of the text.
    Eof,
}

impl Tok<'_> {
    /// Whether a value may follow this token.
    fn values_allowed(&self) -> bool {
        matches!(self, Tok::Eq | Tok::ArrayB | Tok::Comma)
    }

    /// A short name for messages.
    pub fn describe(&self) -> String {
        match self {
            Tok::Int(s) | Tok::Float(s) | Tok::Bare(s) | Tok::Ident(s) => format!("'{s}'"),
            Tok::Escaped(s) => format!("\"{s}\""),
            Tok::Single(s) => format!("'{s}'"),
            Tok::Eq => "'='".into(),
            Tok::SectionB => "'{'".into(),
            Tok::SectionE => "'}'".into(),
            Tok::ArrayB => "'['".into(),
            Tok::ArrayE => "']'".into(),
            Tok::Comma => "','".into(),
            Tok::Eof => "the end of the text".into(),
        }
    }
}

/// C's `isspace` (which LVM2 uses): ASCII whitespace plus vertical tab.
pub fn is_space(c: u8) -> bool {
    c.is_ascii_whitespace() || c == 0x0b
}

/// Splits a text into tokens.
pub struct Lexer<'a> {
    text: &'a str,
    pos: usize,
    prev: Tok<'a>,
}

impl<'a> Lexer<'a> {
    /// A lexer over `text` (which must not contain NUL: the parser cuts the text there).
    pub fn new(text: &'a str) -> Lexer<'a> {
        Lexer {
            text,
            pos: 0,
            // LVM2 starts as if after a section end: a key is expected.
            prev: Tok::SectionE,
        }
    }

    /// An error at byte `at` of the text.
    pub fn error_at(&self, at: usize, message: impl Into<String>) -> TextError {
        let before = &self.text.as_bytes()[..at.min(self.text.len())];
        let line_start = before
            .iter()
            .rposition(|&c| c == b'\n')
            .map_or(0, |i| i + 1);
        let line = 1 + before.iter().filter(|&&c| c == b'\n').count();
        TextError {
            line,
            column: at - line_start + 1,
            message: message.into(),
        }
    }

    fn skip_space_and_comments(&mut self) {
        let b = self.text.as_bytes();
        while self.pos < b.len() {
            match b[self.pos] {
                b'#' => {
                    while self.pos < b.len() && b[self.pos] != b'\n' {
                        self.pos += 1;
                    }
                }
                c if is_space(c) => self.pos += 1,
                _ => break,
            }
        }
    }

    /// The next token and the byte offset where it starts.
    pub fn next_token(&mut self) -> Result<(Tok<'a>, usize), TextError> {
        self.skip_space_and_comments();
        let b = self.text.as_bytes();
        let start = self.pos;
        if start >= b.len() {
            self.prev = Tok::Eof;
            return Ok((Tok::Eof, start));
        }
        let values = self.prev.values_allowed();
        let mut end = start + 1;
        let tok = match b[start] {
            b'{' => Tok::SectionB,
            b'}' => Tok::SectionE,
            b'[' => Tok::ArrayB,
            b']' => Tok::ArrayE,
            b',' => Tok::Comma,
            b'=' => Tok::Eq,
            b'"' => {
                while end < b.len() && b[end] != b'"' {
                    if b[end] == b'\\' && end + 1 < b.len() {
                        end += 1;
                    }
                    end += 1;
                }
                if end >= b.len() {
                    return Err(self.error_at(start, "string not terminated"));
                }
                end += 1;
                Tok::Escaped(&self.text[start + 1..end - 1])
            }
            b'\'' => {
                while end < b.len() && b[end] != b'\'' {
                    end += 1;
                }
                if end >= b.len() {
                    return Err(self.error_at(start, "string not terminated"));
                }
                end += 1;
                Tok::Single(&self.text[start + 1..end - 1])
            }
            c if values && (c.is_ascii_digit() || matches!(c, b'+' | b'-' | b'.')) => {
                let mut float = c == b'.';
                while end < b.len() {
                    if b[end].is_ascii_digit() {
                        end += 1;
                    } else if b[end] == b'.' && !float {
                        float = true;
                        end += 1;
                    } else {
                        break;
                    }
                }
                let s = &self.text[start..end];
                if float {
                    Tok::Float(s)
                } else {
                    Tok::Int(s)
                }
            }
            _ => {
                end = start;
                while end < b.len()
                    && !is_space(b[end])
                    && !matches!(b[end], b'#' | b'=' | b'{' | b'}')
                {
                    end += 1;
                }
                let s = &self.text[start..end];
                if values {
                    Tok::Bare(s)
                } else {
                    Tok::Ident(s)
                }
            }
        };
        self.pos = end;
        self.prev = tok.clone();
        Ok((tok, start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(text: &str) -> Vec<Tok<'_>> {
        let mut l = Lexer::new(text);
        let mut out = Vec::new();
        loop {
            let (t, _) = l.next_token().unwrap();
            if t == Tok::Eof {
                return out;
            }
            out.push(t);
        }
    }

    #[test]
    fn numbers_only_in_value_position() {
        assert_eq!(
            all("1x = -12 # c\n2 = [3.5, 'a', \"b\\\"c\"]"),
            vec![
                Tok::Ident("1x"),
                Tok::Eq,
                Tok::Int("-12"),
                Tok::Ident("2"),
                Tok::Eq,
                Tok::ArrayB,
                Tok::Float("3.5"),
                Tok::Comma,
                Tok::Single("a"),
                Tok::Comma,
                Tok::Escaped("b\\\"c"),
                Tok::ArrayE,
            ]
        );
    }

    #[test]
    fn unterminated_string_is_an_error_with_its_line() {
        let mut l = Lexer::new("a = 1\nb = \"xy");
        let e = loop {
            match l.next_token() {
                Ok((Tok::Eof, _)) => panic!("no error"),
                Ok(_) => {}
                Err(e) => break e,
            }
        };
        assert_eq!((e.line, e.column), (2, 5));
    }
}
