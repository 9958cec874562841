//! The table corpus: every malformed table gives its specific error (line, field, message),
//! and every good table parses, prints in normalized form and round-trips.

use std::path::{Path, PathBuf};

use tables::table::Table;
use tables::targets::builtin_registry;

fn corpus(dir: &str, ext: &str) -> Vec<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut v: Vec<PathBuf> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

struct Expect {
    line: usize,
    field: Option<usize>,
    message: String,
}

fn expectation(table: &Path) -> Expect {
    let p = table.with_extension("expect");
    let text = std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: no expectations file: {e}", p.display()));
    let mut line = None;
    let mut field = None;
    let mut message = None;
    for l in text.lines() {
        let (k, v) = l
            .split_once(':')
            .unwrap_or_else(|| panic!("{}: bad line {l}", p.display()));
        let v = v.trim();
        match k {
            "line" => line = Some(v.parse().unwrap()),
            "field" => {
                field = Some(if v == "none" {
                    None
                } else {
                    Some(v.parse().unwrap())
                })
            }
            "message" => message = Some(v.to_string()),
            _ => panic!("{}: unknown key {k}", p.display()),
        }
    }
    Expect {
        line: line.unwrap(),
        field: field.unwrap(),
        message: message.unwrap(),
    }
}

#[test]
fn bad_tables_give_their_specific_errors() {
    let reg = builtin_registry();
    let files = corpus("bad", "table");
    assert!(files.len() >= 35, "only {} bad tables", files.len());
    let mut failures = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let want = expectation(f);
        match Table::parse(&text, &reg) {
            Ok(t) => failures.push(format!("{}: parsed, but should fail:\n{t}", f.display())),
            Err(e) => {
                let shown = e.to_string();
                if e.line != want.line || e.field != want.field || !e.msg.contains(&want.message) {
                    failures.push(format!(
                        "{}: got line {} field {:?} '{}', want line {} field {:?} containing '{}'",
                        f.display(),
                        e.line,
                        e.field,
                        e.msg,
                        want.line,
                        want.field,
                        want.message
                    ));
                }
                // The display form leads with the position.
                let prefix = if e.line == 0 {
                    "table".to_string()
                } else {
                    format!("line {}", e.line)
                };
                assert!(shown.starts_with(&prefix), "{shown}");
                if let Some(fi) = e.field {
                    assert!(shown.contains(&format!(", field {fi}")), "{shown}");
                    assert!(
                        e.field_name.is_some(),
                        "{}: field {fi} has no name",
                        f.display()
                    );
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn good_tables_parse_normalize_and_round_trip() {
    let reg = builtin_registry();
    let files = corpus("good", "table");
    assert!(files.len() >= 8);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        let t = Table::parse(&text, &reg).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let printed = t.to_string();
        let out = f.with_extension("out");
        let expected = if out.exists() {
            std::fs::read_to_string(&out).unwrap()
        } else {
            // Without an .out file the table is already in normalized form.
            text.clone()
        };
        assert_eq!(printed, expected, "{}", f.display());
        let again = Table::parse(&printed, &reg).unwrap();
        assert_eq!(
            again.to_string(),
            printed,
            "{}: printing is not idempotent",
            f.display()
        );
        let strip = |t: &Table| {
            t.segments
                .iter()
                .map(|s| (s.start, s.len, s.target.clone(), s.args.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&again), strip(&t), "{}", f.display());
        assert_eq!(again.size(), t.size());
    }
}

#[test]
fn dmsetup_output_parses_unchanged() {
    let reg = builtin_registry();
    for line in [
        "0 2097152 linear 7:0 2048\n",
        "0 4194304 striped 2 128 7:1 0 7:2 0\n",
    ] {
        let t = Table::parse(line, &reg).unwrap();
        assert_eq!(t.to_string(), line);
        assert_eq!(t.segments[0].line, 1);
    }
    let t = Table::parse("0 2097152 linear 7:0 2048", &reg).unwrap();
    assert_eq!(t.size(), tables::Sectors(2097152));
    assert_eq!(t.segments[0].args, vec!["7:0", "2048"]);
}

#[test]
fn error_display_format() {
    let reg = builtin_registry();
    let e = Table::parse("0 8 zero\n8 96 striped 2 12 a 0 b 0\n", &reg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 2, field 5 (chunk size): 12 is not a power of two"
    );
    let e = Table::parse("", &reg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "table: no segments (the table is empty or only comments)"
    );
    let e = Table::parse("0 100 flakey a 0 1 1 5 corrupt_bio_byte 3 q 1 0", &reg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1, field 11 (corrupt_bio_byte direction): invalid corrupt bio direction 'q' (r or w)"
    );
    let e = Table::parse("0 100 delay a 0 1 b 0 x", &reg).unwrap_err();
    assert_eq!(
        e.to_string(),
        "line 1, field 9 (write delay): 'x' is not a number"
    );
}
