//! How large a summary may be, checked before anything large is built from it.
//!
//! A summary is read whole (it is small for every real run: ~60 metrics, ~45 checks and
//! thresholds), so its cost is its bytes plus the tree parsed from them. The bytes are
//! capped by the reader (`fetch.max_summary_bytes`, `fetch.max_inflated_bytes`); the tree
//! is capped here by counting JSON values as `serde_json::Value` is built, stopping at the
//! first value past a cap ([`parse_document`]), so a refused document never holds more
//! than a document at the cap would; the detail rows are capped on the normalised summary
//! ([`check_rows`]) before any row is extracted.
//!
//! A summary above a cap is refused whole, as unusable: the run is recorded as `error`
//! with the reason and the file is kept in S3, like any unreadable summary. Keeping the
//! first N metrics instead would store a run that looks complete but is not (which N are
//! "first" is k6's key order, unrelated to what matters: `http_req_duration` could be
//! cut), and the thresholds verdict could change with what was dropped. Real runs sit
//! two orders of magnitude below the defaults, so only a broken or hostile file hits them.

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use super::SummaryError;
use super::model::Summary;

/// Caps on one summary; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SummaryLimits {
    /// JSON values (objects, arrays, strings, numbers, ...) in the document.
    pub max_nodes: u64,
    /// Metric keys (each a `k6_metrics_history` row).
    pub max_metrics: usize,
    pub max_checks: usize,
    pub max_thresholds: usize,
}

impl Default for SummaryLimits {
    /// The compiled-in defaults of `fetch.max_summary_nodes`, `ingest.max_metrics`,
    /// `ingest.max_checks` and `ingest.max_thresholds`.
    fn default() -> Self {
        Self {
            max_nodes: 100_000,
            max_metrics: 10_000,
            max_checks: 10_000,
            max_thresholds: 10_000,
        }
    }
}

/// The document's tree, as `serde_json::from_slice::<Value>` builds it (the same values,
/// key order and syntax errors), refused at the first value past `max_nodes` JSON values
/// or `max_metrics` metrics. Metrics are the entries of the top-level `metrics` object
/// (handleSummary data, legacy export) or of `results.metrics` (machine-readable); checks
/// and thresholds sit deeper and are counted on the parsed summary.
///
/// One pass, where a counting pass before the parse read every summary twice: a tenth of
/// the worker's CPU per run went to the summary's tree.
pub fn parse_document(bytes: &[u8], limits: &SummaryLimits) -> Result<Value, SummaryError> {
    let tally = Tally::default();
    let counter = Counter {
        tally: &tally,
        limits,
        role: Role::Top,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed = counter
        .deserialize(&mut de)
        .and_then(|doc| de.end().map(|()| doc));
    match tally.over.get() {
        Some(Over::Nodes) => Err(SummaryError::TooLarge(format!(
            "more than {} JSON values (fetch.max_summary_nodes)",
            limits.max_nodes
        ))),
        Some(Over::Metrics) => Err(SummaryError::TooLarge(format!(
            "more than the {} metrics allowed (ingest.max_metrics)",
            limits.max_metrics
        ))),
        None => parsed.map_err(|e| SummaryError::Json(e.to_string())),
    }
}

/// Refuses a summary with more metrics, checks or thresholds than the caps allow.
pub fn check_rows(summary: &Summary, limits: &SummaryLimits) -> Result<(), SummaryError> {
    let thresholds: usize = summary.metrics.iter().map(|m| m.thresholds.len()).sum();
    for (what, n, max, setting) in [
        (
            "metrics",
            summary.metrics.len(),
            limits.max_metrics,
            "ingest.max_metrics",
        ),
        (
            "checks",
            summary.checks.len(),
            limits.max_checks,
            "ingest.max_checks",
        ),
        (
            "thresholds",
            thresholds,
            limits.max_thresholds,
            "ingest.max_thresholds",
        ),
    ] {
        if n > max {
            return Err(SummaryError::TooLarge(format!(
                "{n} {what}, more than the {max} allowed ({setting})"
            )));
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Over {
    Nodes,
    Metrics,
}

#[derive(Default)]
struct Tally {
    nodes: Cell<u64>,
    metrics: Cell<u64>,
    over: Cell<Option<Over>>,
}

/// Where in the document a value sits, as far as counting metrics is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The document itself.
    Top,
    /// The machine-readable format's `results` object.
    Results,
    /// The object or array whose direct children are the metrics.
    Metrics,
    /// One metric.
    Metric,
    /// Anything else.
    Other,
}

/// Builds a document's values, counting each, and stops at a cap.
#[derive(Clone, Copy)]
struct Counter<'a> {
    tally: &'a Tally,
    limits: &'a SummaryLimits,
    role: Role,
}

impl Counter<'_> {
    fn bump<E: de::Error>(&self) -> Result<(), E> {
        let n = self.tally.nodes.get() + 1;
        self.tally.nodes.set(n);
        if n > self.limits.max_nodes {
            return self.stop(Over::Nodes);
        }
        Ok(())
    }

    fn stop<E: de::Error>(&self, why: Over) -> Result<(), E> {
        self.tally.over.set(Some(why));
        Err(E::custom("summary above a size cap"))
    }

    /// The seed for a child value: `key` is its key in an object, if any (only the
    /// keys of the document and of `results` change a child's role).
    fn child(&self, key: Option<&str>) -> Self {
        let role = match (self.role, key) {
            (Role::Top, Some("metrics")) | (Role::Results, Some("metrics")) => Role::Metrics,
            (Role::Top, Some("results")) => Role::Results,
            (Role::Metrics, _) => Role::Metric,
            _ => Role::Other,
        };
        Self { role, ..*self }
    }
}

impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.role == Role::Metric {
            // Counted here, once the value exists (a seed is made before a sequence
            // knows whether another element follows).
            let n = self.tally.metrics.get() + 1;
            self.tally.metrics.set(n);
            if n > self.limits.max_metrics as u64 {
                self.stop(Over::Metrics)?;
            }
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<Value, E> {
        self.bump().map(|()| Value::Bool(b))
    }
    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Value, E> {
        self.bump().map(|()| Value::Number(n.into()))
    }
    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Value, E> {
        self.bump().map(|()| Value::Number(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<Value, E> {
        // As serde_json's own `Value`: JSON has no non-finite number, so never null here.
        self.bump()
            .map(|()| Number::from_f64(n).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<Value, E> {
        self.bump().map(|()| Value::String(s.to_owned()))
    }
    fn visit_string<E: de::Error>(self, s: String) -> Result<Value, E> {
        self.bump().map(|()| Value::String(s))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.bump().map(|()| Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.bump().map(|()| Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.bump()?;
        let mut items = Vec::new();
        while let Some(v) = seq.next_element_seed(self.child(None))? {
            items.push(v);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.bump()?;
        let mut entries = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(self.child(Some(&key)))?;
            // A key given twice keeps its first place and its last value, as in
            // serde_json's own `Value`.
            entries.insert(key, value);
        }
        Ok(Value::Object(entries))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::parse_summary;

    #[test]
    fn counts_values_as_it_builds_them() {
        let nodes = |max_nodes| SummaryLimits {
            max_nodes,
            ..SummaryLimits::default()
        };
        // 1 array + 3 numbers; 1 object + 2 values.
        assert!(parse_document(b"[1,2,3]", &nodes(4)).is_ok());
        assert!(matches!(
            parse_document(b"[1,2,3]", &nodes(3)),
            Err(SummaryError::TooLarge(_))
        ));
        assert!(parse_document(br#"{"a":{"b":null}}"#, &nodes(3)).is_ok());
        assert!(parse_document(br#"{"a":{"b":null}}"#, &nodes(2)).is_err());
        // A syntax error is reported as serde_json reports it, within the caps or not.
        let json_error = |doc: &[u8], n| match parse_document(doc, &nodes(n)) {
            Err(SummaryError::Json(e)) => e,
            other => panic!("{other:?}"),
        };
        let expected = serde_json::from_slice::<Value>(b"{not json").unwrap_err();
        assert_eq!(json_error(b"{not json", 1), expected.to_string());
        let expected = serde_json::from_slice::<Value>(b"[1] 2").unwrap_err();
        assert_eq!(json_error(b"[1] 2", 10), expected.to_string());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let expected = serde_json::from_slice::<Value>(deep.as_bytes()).unwrap_err();
        assert_eq!(json_error(deep.as_bytes(), u64::MAX), expected.to_string());
    }

    #[test]
    fn builds_the_tree_serde_json_builds() {
        let docs = [
            r#"{"b":1,"a":[true,null,-2,3.5e-7,18446744073709551615,"x\u0000y"],"b":{"c":{}}}"#,
            r#"{"version":"1.0.0","results":{"metrics":[{"name":"a"},{"name":"b"}]}}"#,
            "[]",
            "0.1",
        ];
        for doc in docs {
            let ours = parse_document(doc.as_bytes(), &SummaryLimits::default()).unwrap();
            let theirs: Value = serde_json::from_str(doc).unwrap();
            assert_eq!(ours, theirs, "{doc}");
            // The same key order too (`preserve_order`), which `==` does not compare.
            assert_eq!(ours.to_string(), theirs.to_string(), "{doc}");
        }
        for fixture in crate::summary::parse::tests::fixture_summaries() {
            let bytes = std::fs::read(&fixture).unwrap();
            let ours = parse_document(&bytes, &SummaryLimits::default()).unwrap();
            let theirs: Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(
                ours.to_string(),
                theirs.to_string(),
                "{}",
                fixture.display()
            );
        }
    }

    #[test]
    fn counts_metrics_of_every_format_before_parsing() {
        let two = SummaryLimits {
            max_metrics: 2,
            ..SummaryLimits::default()
        };
        let ok = |doc: &str| parse_document(doc.as_bytes(), &two).is_ok();
        assert!(ok(
            r#"{"metrics":{"a":{},"b":{"metrics":{"x":1,"y":2,"z":3}}}}"#
        ));
        assert!(!ok(r#"{"metrics":{"a":{},"b":{},"c":{}}}"#));
        assert!(ok(r#"{"version":"1.0.0","results":{"metrics":[{},{}]}}"#));
        assert!(!ok(
            r#"{"version":"1.0.0","results":{"metrics":[{},{},{}]}}"#
        ));
        // Only the top-level `metrics` (or `results.metrics`) holds metrics.
        assert!(ok(r#"{"other":{"metrics":{"a":1,"b":2,"c":3}}}"#));
        let err = parse_document(br#"{"metrics":{"a":1,"b":2,"c":3}}"#, &two)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ingest.max_metrics"), "{err}");
    }

    #[test]
    fn rows_above_a_cap_refuse_the_summary() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/k6/v1.1.0/thresholds-fail/summary.json");
        let s = parse_summary(&std::fs::read(dir).unwrap()).unwrap();
        let ok = SummaryLimits::default();
        assert!(check_rows(&s, &ok).is_ok());
        let n = s.metrics.len();
        let tight = SummaryLimits {
            max_metrics: n - 1,
            ..ok
        };
        let err = check_rows(&s, &tight).unwrap_err().to_string();
        assert!(err.contains("ingest.max_metrics"), "{err}");
        let tight = SummaryLimits {
            max_thresholds: 0,
            ..ok
        };
        assert!(check_rows(&s, &tight).is_err());
    }
}
