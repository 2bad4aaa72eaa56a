//! How large a summary may be, checked before anything large is built from it.
//!
//! A summary is read whole (it is small for every real run: ~60 metrics, ~45 checks and
//! thresholds), so its cost is its bytes plus the tree parsed from them. The bytes are
//! capped by the reader (`fetch.max_summary_bytes`, `fetch.max_inflated_bytes`); the tree
//! is capped here by counting JSON values in a pass that builds nothing
//! ([`check_document`]), before `serde_json::Value` is built; the detail rows are capped
//! on the normalised summary ([`check_rows`]) before any row is extracted.
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
            max_nodes: 200_000,
            max_metrics: 10_000,
            max_checks: 10_000,
            max_thresholds: 10_000,
        }
    }
}

/// Refuses a document with more than `max_nodes` JSON values, without building it.
///
/// A syntax error is not reported here: parsing reports it with its usual message, and
/// stops at the same place, having built no more values than were counted.
pub fn check_document(bytes: &[u8], max_nodes: u64) -> Result<(), SummaryError> {
    let over = Cell::new(false);
    let count = Cell::new(0u64);
    let counter = Counter {
        count: &count,
        max: max_nodes,
        over: &over,
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let _ = counter.deserialize(&mut de);
    if over.get() {
        return Err(SummaryError::TooLarge(format!(
            "more than {max_nodes} JSON values (fetch.max_summary_nodes)"
        )));
    }
    Ok(())
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

/// Counts every value of a document and stops at the cap; builds nothing.
#[derive(Clone, Copy)]
struct Counter<'a> {
    count: &'a Cell<u64>,
    max: u64,
    over: &'a Cell<bool>,
}

impl Counter<'_> {
    fn bump<E: de::Error>(&self) -> Result<(), E> {
        let n = self.count.get() + 1;
        self.count.set(n);
        if n > self.max {
            self.over.set(true);
            return Err(E::custom("too many JSON values"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.bump()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.bump()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.bump()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.bump()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.bump()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.bump()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.bump()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.bump()?;
        while map.next_key::<de::IgnoredAny>()?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::summary::parse_summary;

    #[test]
    fn counts_values_without_building_them() {
        // 1 array + 3 numbers; 1 object + 2 values.
        assert!(check_document(b"[1,2,3]", 4).is_ok());
        assert!(matches!(
            check_document(b"[1,2,3]", 3),
            Err(SummaryError::TooLarge(_))
        ));
        assert!(check_document(br#"{"a":{"b":null}}"#, 3).is_ok());
        assert!(check_document(br#"{"a":{"b":null}}"#, 2).is_err());
        // Syntax errors are left to the parser.
        assert!(check_document(b"{not json", 1).is_ok());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(check_document(deep.as_bytes(), u64::MAX).is_ok());
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
