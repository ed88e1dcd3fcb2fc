//! Parsing `instance import`'s JSON lines, with line numbers in every complaint.

use std::collections::HashMap;

use nodekeeper_store::{Generation, HostName, InstanceId, InstancePolicy, NewInstance, Storage};
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

/// One line of the file (contract: `{"uuid","name","host","ha","storage","generation"?,"domain_xml"?}`;
/// extended with the recovery policy: `"priority"?`, `"anti_affinity"?`, `"max_relocate"?`,
/// `"after"?` — UUIDs of instances that must run before this one moves in a recovery).
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
    #[serde(default)]
    priority: i64,
    #[serde(default)]
    anti_affinity: Option<String>,
    #[serde(default)]
    max_relocate: Option<u32>,
    #[serde(default)]
    after: Vec<InstanceId>,
}

/// An instance's size from its domain XML: `<vcpu>` and `<memory unit=…>` (KiB by default),
/// `(0, 0)` for what is not there. A malformed XML is an error.
pub(crate) fn domain_size(xml: &str) -> Result<(u32, u64), String> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("domain_xml: {e}"))?;
    let root = doc.root_element();
    let child = |name: &str| root.children().find(|n| n.has_tag_name(name));
    let vcpus = match child("vcpu").and_then(|n| n.text()) {
        Some(t) => t.trim().parse::<u32>().map_err(|_| format!("domain_xml: <vcpu>{t}</vcpu> is no count"))?,
        None => 0,
    };
    let memory_mib = match child("memory") {
        Some(n) => {
            let t = n.text().unwrap_or_default().trim();
            let v: u64 = t.parse().map_err(|_| format!("domain_xml: <memory>{t}</memory> is no size"))?;
            let bytes_per = match n.attribute("unit").unwrap_or("KiB") {
                "b" | "bytes" => 1,
                "KB" => 1_000,
                "k" | "KiB" => 1 << 10,
                "MB" => 1_000_000,
                "M" | "MiB" => 1 << 20,
                "GB" => 1_000_000_000,
                "G" | "GiB" => 1 << 30,
                "TB" => 1_000_000_000_000,
                "T" | "TiB" => 1 << 40,
                other => return Err(format!("domain_xml: unknown memory unit {other:?}")),
            };
            v.saturating_mul(bytes_per).div_ceil(1 << 20)
        }
        None => 0,
    };
    Ok((vcpus, memory_mib))
}

/// Parses JSON lines into instances, each with its 1-based line number. Blank lines are
/// skipped. Fails on the first bad line: malformed JSON, a missing or unknown field, an
/// empty name, generation 0, or a UUID already seen on an earlier line.
pub fn parse_jsonl(text: &str) -> Result<Vec<(usize, NewInstance, InstancePolicy)>, ImportError> {
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
        if l.anti_affinity.as_deref().is_some_and(|g| !nodekeeper_store::valid_group(g)) {
            return Err(err("\"anti_affinity\": 1 to 64 of [A-Za-z0-9_.-]".into()));
        }
        let (vcpus, memory_mib) = l.domain_xml.as_deref().map(domain_size).transpose().map_err(err)?.unwrap_or((0, 0));
        let policy = InstancePolicy {
            priority: l.priority,
            anti_affinity: l.anti_affinity,
            max_relocate: l.max_relocate,
            relocations: 0,
            vcpus,
            memory_mib,
            after: l.after,
        };
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
            policy,
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
        assert_eq!(parsed[1].2, InstancePolicy::default());
    }

    #[test]
    fn the_policy_fields_and_the_size_from_the_domain_xml_are_read() {
        let xml = "<domain type='kvm'><vcpu placement='static'>4</vcpu><memory unit='GiB'>8</memory></domain>";
        let extra = format!(r#","priority":10,"anti_affinity":"db","max_relocate":2,"domain_xml":"{xml}""#);
        let parsed = parse_jsonl(&line(A, &extra)).expect("valid");
        let p = &parsed[0].2;
        assert_eq!((p.priority, p.anti_affinity.as_deref(), p.max_relocate), (10, Some("db"), Some(2)));
        assert_eq!((p.vcpus, p.memory_mib), (4, 8192));
        assert_eq!(domain_size("<domain><memory>2097152</memory></domain>"), Ok((0, 2048)), "KiB by default");
        assert_eq!(domain_size("<domain/>"), Ok((0, 0)));
        assert!(domain_size("<domain><memory unit='parsec'>1</memory></domain>").is_err());
        assert!(domain_size("<domain><vcpu>many</vcpu></domain>").is_err());
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
            (line(A, r#","anti_affinity":"db one""#), 1, "anti_affinity"),
            (line(A, r#","domain_xml":"<domain><vcpu>x</vcpu></domain>""#), 1, "no count"),
            (line(A, r#","domain_xml":"<domain>""#), 1, "domain_xml"),
        ];
        for (text, want_line, want) in cases {
            let err = parse_jsonl(&text).expect_err(&text);
            assert_eq!(err.line, want_line, "{text}: {err}");
            assert!(err.reason.contains(want), "{text}: {err}");
        }
    }
}
