//! JUnit XML for `nyx check`: one `<testcase>` per case of the check, with
//! how many repetitions ran, the distinct failures (message and the trace
//! of each, as a `trace` property and as an `[[ATTACHMENT|path]]` line that
//! Jenkins and GitLab show), and the merge of the reports of several shards
//! (`nyx check merge-junit`): cases are joined by name, their repetitions
//! and times added, their failures put together.

use quick_xml::events::Event;
use quick_xml::Reader;

/// One case of a report.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JCase {
    /// The case's name.
    pub name: String,
    /// Seconds its repetitions ran.
    pub time: f64,
    /// Repetitions run.
    pub runs: u64,
    /// Repetitions not run (the case stopped at its first failure).
    pub skipped: u64,
    /// Its distinct failures: one line of message, the full text.
    pub failures: Vec<(String, String)>,
    /// Paths of the failures' traces.
    pub traces: Vec<String>,
}

/// A report: the cases of a check (of one shard, or merged).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct JSuite {
    /// The suite's name.
    pub name: String,
    /// Its cases.
    pub cases: Vec<JCase>,
}

/// Errors reading a report.
#[derive(Debug, thiserror::Error)]
pub enum JunitError {
    /// Not well-formed XML.
    #[error("not a JUnit XML report: {0}")]
    Xml(String),
    /// An attribute nyx writes is missing or wrong.
    #[error("not a report of nyx check: {0}")]
    Content(String),
}

fn esc(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".into(),
            '<' => "&lt;".into(),
            '>' => "&gt;".into(),
            '"' => "&quot;".into(),
            '\n' => "&#10;".into(),
            '\t' => "&#9;".into(),
            '\r' => "&#13;".into(),
            // Not allowed in XML 1.0 at all, even escaped.
            c if c.is_control() => "\u{fffd}".into(),
            c => c.to_string(),
        })
        .collect()
}

/// Text content (newlines kept as they are).
fn esc_text(s: &str) -> String {
    esc(s).replace("&#10;", "\n")
}

impl JSuite {
    /// Cases that failed.
    pub fn failed(&self) -> usize {
        self.cases.iter().filter(|c| !c.failures.is_empty()).count()
    }

    /// Cases none of whose repetitions ran.
    pub fn skipped(&self) -> usize {
        self.cases
            .iter()
            .filter(|c| c.runs == 0 && c.failures.is_empty())
            .count()
    }

    /// The report as JUnit XML.
    pub fn to_xml(&self) -> String {
        let time: f64 = self.cases.iter().map(|c| c.time).sum();
        let (tests, failures, skipped) = (self.cases.len(), self.failed(), self.skipped());
        let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x += &format!(
            "<testsuites name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{time:.3}\">\n",
            esc(&self.name)
        );
        x += &format!(
            "  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\" errors=\"0\" skipped=\"{skipped}\" time=\"{time:.3}\">\n",
            esc(&self.name)
        );
        for c in &self.cases {
            x += &format!(
                "    <testcase name=\"{}\" classname=\"nyx.check\" time=\"{:.3}\">\n",
                esc(&c.name),
                c.time
            );
            x += "      <properties>\n";
            x += &format!("        <property name=\"repetitions\" value=\"{}\"/>\n", c.runs);
            x += &format!("        <property name=\"skipped\" value=\"{}\"/>\n", c.skipped);
            for t in &c.traces {
                x += &format!("        <property name=\"trace\" value=\"{}\"/>\n", esc(t));
            }
            x += "      </properties>\n";
            for (message, text) in &c.failures {
                x += &format!(
                    "      <failure message=\"{}\" type=\"nyx-check\">{}</failure>\n",
                    esc(message),
                    esc_text(text)
                );
            }
            if c.runs == 0 && c.failures.is_empty() {
                x += "      <skipped/>\n";
            }
            if !c.traces.is_empty() {
                let lines: Vec<String> = c.traces.iter().map(|t| format!("[[ATTACHMENT|{t}]]")).collect();
                x += &format!("      <system-out>{}</system-out>\n", esc_text(&lines.join("\n")));
            }
            x += "    </testcase>\n";
        }
        x += "  </testsuite>\n</testsuites>\n";
        x
    }

    /// Reads a report that [`JSuite::to_xml`] wrote.
    pub fn parse(xml: &str) -> Result<JSuite, JunitError> {
        let mut r = Reader::from_str(xml);
        let mut suite = JSuite::default();
        let mut case: Option<JCase> = None;
        let mut failure: Option<(String, String)> = None;
        let xerr = |e: &dyn std::fmt::Display| JunitError::Xml(e.to_string());
        loop {
            let ev = r.read_event().map_err(|e| xerr(&e))?;
            match ev {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let empty = matches!(ev, Event::Empty(_));
                    let mut attrs = std::collections::HashMap::new();
                    for a in e.attributes() {
                        let a = a.map_err(|e| xerr(&e))?;
                        let key = String::from_utf8_lossy(a.key.as_ref()).into_owned();
                        let value = a.unescape_value().map_err(|e| xerr(&e))?.into_owned();
                        attrs.insert(key, value);
                    }
                    let get = |k: &str| attrs.get(k).cloned().unwrap_or_default();
                    match e.name().as_ref() {
                        b"testsuites" | b"testsuite" if suite.name.is_empty() => suite.name = get("name"),
                        b"testcase" => {
                            let time = get("time").parse().unwrap_or(0.0);
                            let c = JCase {
                                name: get("name"),
                                time,
                                ..JCase::default()
                            };
                            if empty {
                                suite.cases.push(c);
                            } else {
                                case = Some(c);
                            }
                        }
                        b"property" => {
                            let c = case
                                .as_mut()
                                .ok_or_else(|| JunitError::Content("a property outside a testcase".into()))?;
                            let number = |v: String| {
                                v.parse::<u64>().map_err(|_| {
                                    JunitError::Content(format!("property {:?}: not a number: {v:?}", get("name")))
                                })
                            };
                            match get("name").as_str() {
                                "repetitions" => c.runs = number(get("value"))?,
                                "skipped" => c.skipped = number(get("value"))?,
                                "trace" => c.traces.push(get("value")),
                                _ => {}
                            }
                        }
                        b"failure" => {
                            let f = (get("message"), String::new());
                            if empty {
                                if let Some(c) = case.as_mut() {
                                    c.failures.push(f);
                                }
                            } else {
                                failure = Some(f);
                            }
                        }
                        _ => {}
                    }
                }
                Event::Text(t) => {
                    if let Some(f) = failure.as_mut() {
                        let t = t.xml_content().map_err(|e| xerr(&e))?;
                        f.1.push_str(&t);
                    }
                }
                Event::GeneralRef(g) => {
                    if let Some(f) = failure.as_mut() {
                        let name = String::from_utf8_lossy(&g).into_owned();
                        let c = match name.as_str() {
                            "amp" => Some('&'),
                            "lt" => Some('<'),
                            "gt" => Some('>'),
                            "quot" => Some('"'),
                            "apos" => Some('\''),
                            n => n
                                .strip_prefix("#x")
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .or_else(|| n.strip_prefix('#').and_then(|d| d.parse().ok()))
                                .and_then(char::from_u32),
                        };
                        let c = c.ok_or_else(|| JunitError::Xml(format!("unknown entity &{name};")))?;
                        f.1.push(c);
                    }
                }
                Event::End(e) => match e.name().as_ref() {
                    b"failure" => {
                        if let (Some(c), Some(f)) = (case.as_mut(), failure.take()) {
                            c.failures.push(f);
                        }
                    }
                    b"testcase" => {
                        if let Some(c) = case.take() {
                            suite.cases.push(c);
                        }
                    }
                    _ => {}
                },
                Event::Eof => break,
                _ => {}
            }
        }
        if case.is_some() {
            return Err(JunitError::Xml("the file ends inside a testcase".into()));
        }
        Ok(suite)
    }
}

/// The reports of several shards as one: cases joined by name (in the order
/// they first appear), repetitions, skips and times added, failures and
/// traces put together.
pub fn merge(parts: &[JSuite]) -> JSuite {
    let mut out = JSuite {
        name: parts.first().map(|p| p.name.clone()).unwrap_or_default(),
        cases: Vec::new(),
    };
    let mut at: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for p in parts {
        for c in &p.cases {
            match at.get(&c.name) {
                Some(&i) => {
                    let m = &mut out.cases[i];
                    m.time += c.time;
                    m.runs += c.runs;
                    m.skipped += c.skipped;
                    m.failures.extend(c.failures.iter().cloned());
                    m.traces.extend(c.traces.iter().cloned());
                }
                None => {
                    at.insert(c.name.clone(), out.cases.len());
                    out.cases.push(c.clone());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn case(name: &str, runs: u64, fail: bool) -> JCase {
        JCase {
            name: name.into(),
            time: 0.5,
            runs,
            skipped: 0,
            failures: if fail {
                vec![(
                    "output differs".into(),
                    "output differs at byte 2\n3 repetitions".into(),
                )]
            } else {
                vec![]
            },
            traces: if fail { vec!["f/a-0.nyxtrace".into()] } else { vec![] },
        }
    }

    #[test]
    fn merge_joins_cases_by_name_and_adds_repetitions() {
        let a = JSuite {
            name: "s".into(),
            cases: vec![case("a", 3, false), case("b", 1, true)],
        };
        let b = JSuite {
            name: "s".into(),
            cases: vec![case("a", 2, true), case("c", 4, false)],
        };
        let m = merge(&[a, b]);
        assert_eq!(m.cases.len(), 3);
        assert_eq!(m.cases[0].runs, 5);
        assert_eq!(m.failed(), 2);
        let x = m.to_xml();
        assert!(x.contains("tests=\"3\" failures=\"2\""), "{x}");
        assert!(x.contains("[[ATTACHMENT|f/a-0.nyxtrace]]"), "{x}");
        assert_eq!(JSuite::parse(&x).unwrap(), m);
    }

    #[test]
    fn parse_refuses_what_is_not_xml() {
        assert!(JSuite::parse("<testsuites><testcase name=\"a\">").is_err());
        assert!(JSuite::parse("<a b=\"1></a>").is_err());
    }

    proptest! {
        /// Whatever the names and messages, a report reads back as written.
        #[test]
        fn reports_read_back(cases in proptest::collection::vec(("[ -~\n]{0,12}", 0u64..1000, 0u64..5, proptest::collection::vec(("[ -~]{0,10}", "[ -~\n\t]{0,20}"), 0..3), proptest::collection::vec("[ -~]{1,10}", 0..3)), 0..5), name in "[ -~]{0,8}") {
            let suite = JSuite {
                name,
                cases: cases.into_iter().map(|(name, runs, skipped, failures, traces)| JCase { name, time: 1.25, runs, skipped, failures, traces }).collect(),
            };
            prop_assert_eq!(JSuite::parse(&suite.to_xml()).unwrap(), suite);
        }
    }
}
