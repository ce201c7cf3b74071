//! Suites of `nyx check` cases in TOML (`nyx check --suite suite.toml`):
//!
//! ```toml
//! [defaults]            # optional; any case field but name, input, expect
//! repeat = 100
//!
//! [[case]]
//! name = "echo-abc"     # unique; default: the case's index
//! snapshot = "echo.nyxsnap"
//! input = "abc.in"      # optional: no input
//! expect = "abc.out"    # the expected serial output
//! expect_status = 51    # optional, default 0
//! repeat = 200          # optional, default 1
//! timeout = 30          # seconds per repetition, default 30
//! clock = "check"       # or "host"; default "check"
//! ```
//!
//! Paths are relative to the suite file. `--bless` writes every case's
//! expected output file and its `expect_status` back into the suite,
//! keeping the rest of the file (comments, order) as it was.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nyx_vmm::reset::ClockKind;
use toml_edit::{DocumentMut, Item, Table};

/// One case as the suite gives it.
#[derive(Debug, Clone, PartialEq)]
pub struct CaseSpec {
    /// Its name.
    pub name: String,
    /// The snapshot.
    pub snapshot: PathBuf,
    /// Serial input file, if any.
    pub input: Option<PathBuf>,
    /// Expected output file.
    pub expect: PathBuf,
    /// Expected exit status.
    pub expect_status: i32,
    /// Repetitions.
    pub repeat: u64,
    /// Wall-clock limit per repetition.
    pub timeout: Duration,
    /// The clock.
    pub clock: ClockKind,
}

/// What is wrong with a suite.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct SuiteError {
    /// The suite file.
    pub path: PathBuf,
    /// What is wrong, and where.
    pub what: String,
}

/// A field of a case, or of the defaults.
fn field<'a>(case: &'a Table, defaults: Option<&'a Table>, key: &str) -> Option<&'a Item> {
    case.get(key).or_else(|| defaults.and_then(|d| d.get(key)))
}

/// Reads the suite text `text` of the file `path`.
pub fn parse(path: &Path, text: &str) -> Result<Vec<CaseSpec>, SuiteError> {
    let err = |what: String| SuiteError {
        path: path.to_path_buf(),
        what,
    };
    let doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| err(e.to_string()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let defaults = match doc.get("defaults") {
        None => None,
        Some(d) => Some(d.as_table().ok_or_else(|| err("[defaults] must be a table".into()))?),
    };
    let cases = doc
        .get("case")
        .and_then(|c| c.as_array_of_tables())
        .ok_or_else(|| err("no cases: add [[case]] tables".into()))?;
    let mut out: Vec<CaseSpec> = Vec::new();
    for (i, case) in cases.iter().enumerate() {
        let at = |what: String| err(format!("case {}: {what}", i + 1));
        for (key, _) in case.iter() {
            if ![
                "name",
                "snapshot",
                "input",
                "expect",
                "expect_status",
                "repeat",
                "timeout",
                "clock",
            ]
            .contains(&key)
            {
                return Err(at(format!("unknown field {key:?}")));
            }
        }
        let string = |key: &str, from_defaults: bool| -> Result<Option<String>, SuiteError> {
            let item = if from_defaults {
                field(case, defaults, key)
            } else {
                case.get(key)
            };
            match item {
                None => Ok(None),
                Some(v) => v
                    .as_str()
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| at(format!("{key} must be a string"))),
            }
        };
        let integer = |key: &str| -> Result<Option<i64>, SuiteError> {
            match field(case, defaults, key) {
                None => Ok(None),
                Some(v) => v
                    .as_integer()
                    .map(Some)
                    .ok_or_else(|| at(format!("{key} must be an integer"))),
            }
        };
        let name = string("name", false)?.unwrap_or_else(|| format!("case-{}", i + 1));
        if out.iter().any(|c| c.name == name) {
            return Err(at(format!("a second case named {name:?}")));
        }
        let snapshot = string("snapshot", true)?.ok_or_else(|| at("no snapshot".into()))?;
        let expect = string("expect", false)?.ok_or_else(|| at("no expect (the expected output file)".into()))?;
        let expect_status = integer("expect_status")?.unwrap_or(0);
        let expect_status =
            i32::try_from(expect_status).map_err(|_| at(format!("expect_status {expect_status} is out of range")))?;
        let repeat = integer("repeat")?.unwrap_or(1);
        let repeat = u64::try_from(repeat).map_err(|_| at(format!("repeat {repeat} is negative")))?;
        let timeout = match field(case, defaults, "timeout") {
            None => 30.0,
            Some(v) => v
                .as_float()
                .or_else(|| v.as_integer().map(|i| i as f64))
                .ok_or_else(|| at("timeout must be a number of seconds".into()))?,
        };
        let timeout = Duration::try_from_secs_f64(timeout).map_err(|e| at(format!("timeout {timeout}: {e}")))?;
        let clock = match string("clock", true)? {
            None => ClockKind::Check,
            Some(c) => c.parse().map_err(at)?,
        };
        out.push(CaseSpec {
            name,
            snapshot: base.join(snapshot),
            input: string("input", false)?.map(|p| base.join(p)),
            expect: base.join(expect),
            expect_status,
            repeat,
            timeout,
            clock,
        });
    }
    Ok(out)
}

/// The suite text with each case's `expect_status` set to `statuses[i]`,
/// everything else kept.
pub fn with_statuses(path: &Path, text: &str, statuses: &[i32]) -> Result<String, SuiteError> {
    let err = |what: String| SuiteError {
        path: path.to_path_buf(),
        what,
    };
    let mut doc: DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| err(e.to_string()))?;
    let cases = doc
        .get_mut("case")
        .and_then(|c| c.as_array_of_tables_mut())
        .ok_or_else(|| err("no cases: add [[case]] tables".into()))?;
    if cases.len() != statuses.len() {
        return Err(err("the suite changed while it was blessed".into()));
    }
    for (case, &s) in cases.iter_mut().zip(statuses) {
        case["expect_status"] = toml_edit::value(i64::from(s));
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SUITE: &str = r#"
# shared settings
[defaults]
repeat = 5
clock = "check"
snapshot = "snaps/echo.nyxsnap"

[[case]]
name = "a"
input = "a.in"
expect = "a.out"

[[case]]
expect = "b.out"
repeat = 2
timeout = 1.5
clock = "host"
expect_status = 51
"#;

    #[test]
    fn cases_take_defaults_and_paths_relative_to_the_suite() {
        let c = parse(Path::new("dir/suite.toml"), SUITE).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].name, "a");
        assert_eq!(c[0].snapshot, Path::new("dir/snaps/echo.nyxsnap"));
        assert_eq!(c[0].input.as_deref(), Some(Path::new("dir/a.in")));
        assert_eq!((c[0].repeat, c[0].clock, c[0].expect_status), (5, ClockKind::Check, 0));
        assert_eq!(c[1].name, "case-2");
        assert_eq!((c[1].repeat, c[1].clock, c[1].expect_status), (2, ClockKind::Host, 51));
        assert_eq!(c[1].timeout, Duration::from_millis(1500));
    }

    #[test]
    fn mistakes_are_named_with_their_case() {
        let p = Path::new("s.toml");
        let e = parse(p, "[[case]]\nexpect = \"x\"\n").unwrap_err().to_string();
        assert!(e.contains("case 1: no snapshot"), "{e}");
        let e = parse(p, "[[case]]\nsnapshot = \"s\"\nexpect = \"x\"\nrepat = 3\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field \"repat\""), "{e}");
        let e = parse(p, "[[case]]\nsnapshot = \"s\"\nexpect = \"x\"\nclock = \"wall\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("give host or check"), "{e}");
        assert!(parse(p, "").unwrap_err().to_string().contains("no cases"));
    }

    #[test]
    fn blessing_sets_statuses_and_keeps_the_rest() {
        let p = Path::new("s.toml");
        let t = with_statuses(p, SUITE, &[7, 0]).unwrap();
        assert!(t.contains("# shared settings"), "{t}");
        let c = parse(p, &t).unwrap();
        assert_eq!((c[0].expect_status, c[1].expect_status), (7, 0));
        assert!(with_statuses(p, SUITE, &[1]).is_err());
    }

    proptest! {
        /// Any text: an answer or an error, never a panic.
        #[test]
        fn any_text_parses_or_fails_cleanly(t in "[\\[\\]a-z=\"0-9 \n.]{0,80}") {
            let _ = parse(Path::new("s.toml"), &t);
        }
    }
}
