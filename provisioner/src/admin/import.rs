//! Parsing `instance import`'s JSON lines, with line numbers in every complaint.

use std::collections::HashMap;

use nodekeeper_store::{Generation, HostName, InstanceId, NewInstance, Storage};
use serde::Deserialize;

/// A line of the import file that cannot be imported.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {reason}")]
pub struct ImportError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// One line of the file (contract: `{"uuid","name","host","ha","storage","generation"?,"domain_xml"?}`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    uuid: InstanceId,
    name: String,
    host: HostName,
    ha: bool,
    storage: Storage,
    #[serde(default)]
    generation: Option<u64>,
    #[serde(default)]
    domain_xml: Option<String>,
}

/// Parses JSON lines into instances, each with its 1-based line number. Blank lines are
/// skipped. Fails on the first bad line: malformed JSON, a missing or unknown field, an
/// empty name, generation 0, or a UUID already seen on an earlier line.
pub fn parse_jsonl(text: &str) -> Result<Vec<(usize, NewInstance)>, ImportError> {
    let mut out = Vec::new();
    let mut seen: HashMap<InstanceId, usize> = HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let err = |reason: String| ImportError { line, reason };
        let l: Line = serde_json::from_str(raw).map_err(|e| err(e.to_string()))?;
        if l.name.trim().is_empty() {
            return Err(err("empty \"name\"".into()));
        }
        let generation = match l.generation {
            Some(0) => return Err(err("\"generation\" starts at 1".into())),
            Some(g) => Generation(g),
            None => Generation::FIRST,
        };
        if let Some(first) = seen.insert(l.uuid, line) {
            return Err(err(format!("instance {} already appears on line {first}", l.uuid)));
        }
        out.push((
            line,
            NewInstance {
                uuid: l.uuid,
                name: l.name,
                owner: l.host,
                ha: l.ha,
                storage: l.storage,
                generation,
                domain_xml: l.domain_xml,
            },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "11111111-1111-4111-8111-111111111111";
    const B: &str = "22222222-2222-4222-8222-222222222222";

    fn line(uuid: &str, extra: &str) -> String {
        format!(r#"{{"uuid":"{uuid}","name":"vm","host":"node-a","ha":true,"storage":"shared"{extra}}}"#)
    }

    #[test]
    fn good_lines_parse_with_their_numbers() {
        let text = format!("{}\n\n{}\n", line(A, ""), line(B, r#","generation":4,"domain_xml":"<domain/>""#));
        let parsed = parse_jsonl(&text).expect("valid");
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[0].0, 1);
        assert_eq!(parsed[0].1.generation, Generation(1));
        assert_eq!(parsed[1].0, 3);
        assert_eq!(parsed[1].1.generation, Generation(4));
        assert_eq!(parsed[1].1.domain_xml.as_deref(), Some("<domain/>"));
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            (format!("{}\n{{not json", line(A, "")), 2, "key must be a string"),
            (line("nope", ""), 1, "not a UUID"),
            (line(A, r#","colour":"red""#), 1, "unknown field `colour`"),
            (line(A, r#","generation":0"#), 1, "starts at 1"),
            (
                line(A, "").replace("shared", "nfs"),
                1,
                "unknown variant `nfs`, expected one of `shared`, `volume`, `local`",
            ),
            (line(A, "").replace("\"node-a\"", "\"node a\""), 1, "invalid host name"),
            (line(A, "").replace("\"name\":\"vm\"", "\"name\":\" \""), 1, "empty \"name\""),
            (line(A, "").replace(",\"ha\":true", ""), 1, "missing field `ha`"),
            (format!("{}\n{}\n{}", line(A, ""), line(B, ""), line(A, "")), 3, "already appears on line 1"),
        ];
        for (text, want_line, want) in cases {
            let err = parse_jsonl(&text).expect_err(&text);
            assert_eq!(err.line, want_line, "{text}: {err}");
            assert!(err.reason.contains(want), "{text}: {err}");
        }
    }
}
