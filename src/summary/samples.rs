//! Raw samples from `k6 run --out json` (metrics.ndjson), used to fill in percentiles a
//! summary did not report (default summaries have no p(99)).
//!
//! k6 keeps every trend sample and interpolates linearly between closest ranks
//! (`i = p·(n−1)`), so the same arithmetic over the same samples gives k6's number
//! exactly. The reader is generic over `BufRead`: callers decide where bytes come from.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;

use serde::Deserialize;

/// Which metric (and submetric tag filter) to collect samples for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SampleRequest {
    /// The summary key, e.g. `http_req_duration{status:200}`.
    pub key: String,
    pub base_name: String,
    pub tags: BTreeMap<String, String>,
}

/// Sorted samples per requested key.
#[derive(Debug, Default, Clone)]
pub struct SampleSets {
    pub sets: HashMap<String, Vec<f64>>,
    /// Lines that were not valid JSON (k6 writes `+Inf` bare) or were cut short.
    pub bad_lines: u64,
    /// Base names mentioned on bad lines: their sample sets are incomplete.
    pub tainted: Vec<String>,
    /// Set when reading stopped at the sample cap; the sets are then incomplete.
    pub truncated: bool,
}

impl SampleSets {
    /// Samples of a key, if they were collected completely.
    pub fn complete(&self, key: &str, base_name: &str) -> Option<&[f64]> {
        if self.truncated || self.tainted.iter().any(|t| t == base_name) {
            return None;
        }
        self.sets.get(key).map(Vec::as_slice)
    }
}

#[derive(Deserialize)]
struct Line<'a> {
    #[serde(borrow)]
    metric: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    data: Option<Point<'a>>,
}

#[derive(Deserialize)]
struct Point<'a> {
    value: Option<f64>,
    #[serde(borrow, default)]
    tags: Option<HashMap<Cow<'a, str>, Cow<'a, str>>>,
}

/// Reads metrics.ndjson and keeps the samples the requests ask for, up to `max_samples`.
pub fn collect_samples<R: BufRead>(
    mut reader: R,
    requests: &[SampleRequest],
    max_samples: usize,
) -> std::io::Result<SampleSets> {
    let mut out = SampleSets::default();
    if requests.is_empty() {
        return Ok(out);
    }
    let mut by_base: HashMap<&str, Vec<&SampleRequest>> = HashMap::new();
    for r in requests {
        by_base.entry(r.base_name.as_str()).or_default().push(r);
        out.sets.entry(r.key.clone()).or_default();
    }
    let mut kept = 0usize;
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf)? == 0 {
            break;
        }
        let line = trim_ascii(&buf);
        if line.is_empty() {
            continue;
        }
        let parsed: Line<'_> = match serde_json::from_slice(line) {
            Ok(l) => l,
            Err(_) => {
                out.bad_lines += 1;
                for base in by_base.keys() {
                    let needle = format!("\"metric\":\"{base}\"");
                    if contains(line, needle.as_bytes()) && !out.tainted.iter().any(|t| t == base) {
                        out.tainted.push((*base).to_string());
                    }
                }
                continue;
            }
        };
        if parsed.kind != "Point" {
            continue;
        }
        let Some(reqs) = by_base.get(parsed.metric.as_ref()) else {
            continue;
        };
        let Some(point) = parsed.data else { continue };
        let Some(value) = point.value else { continue };
        for r in reqs {
            let matches = r.tags.iter().all(|(k, v)| {
                point
                    .tags
                    .as_ref()
                    .and_then(|t| t.get(k.as_str()))
                    .is_some_and(|sv| sv == v)
            });
            if matches {
                if kept >= max_samples {
                    out.truncated = true;
                    return Ok(finish(out));
                }
                kept += 1;
                out.sets
                    .get_mut(&r.key)
                    .expect("inserted above")
                    .push(value);
            }
        }
    }
    Ok(finish(out))
}

fn finish(mut out: SampleSets) -> SampleSets {
    for v in out.sets.values_mut() {
        v.sort_by(f64::total_cmp);
    }
    out
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// k6's percentile: 0 samples → 0, 1 sample → that sample, else linear interpolation
/// between closest ranks at `i = p·(n−1)`. `sorted` must be sorted ascending.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let i = (p / 100.0) * (n - 1) as f64;
            let lo = i.floor() as usize;
            let hi = i.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (i - i.floor())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_k6_trend_stats_fixture_values() {
        // k6's own check: 37 samples 1², 2², …, 37².
        let v: Vec<f64> = (1..=37).map(|i| (i * i) as f64).collect();
        assert!((percentile(&v, 90.0) - 1115.8).abs() < 1e-9);
        assert!((percentile(&v, 95.0) - 1239.2).abs() < 1e-9);
        assert!((percentile(&v, 99.0) - 1342.72).abs() < 1e-9);
        assert!((percentile(&v, 99.9) - 1366.372).abs() < 1e-9);
        assert_eq!(percentile(&v, 50.0), 361.0);
        assert_eq!(percentile(&[], 99.0), 0.0);
        assert_eq!(percentile(&[4.0], 99.0), 4.0);
    }

    #[test]
    fn filters_by_tags_and_survives_bad_lines() {
        let data = concat!(
            "{\"type\":\"Metric\",\"data\":{\"name\":\"d\",\"type\":\"trend\"},\"metric\":\"d\"}\n",
            "{\"metric\":\"d\",\"type\":\"Point\",\"data\":{\"time\":\"t\",\"value\":3,\"tags\":{\"status\":\"200\"}}}\n",
            "{\"metric\":\"d\",\"type\":\"Point\",\"data\":{\"time\":\"t\",\"value\":1,\"tags\":{\"status\":\"500\"}}}\n",
            "{\"metric\":\"g\",\"type\":\"Point\",\"data\":{\"time\":\"t\",\"value\":+Inf,\"tags\":{}}}\n",
            "{\"metric\":\"d\",\"type\":\"Po",
        );
        let reqs = vec![
            SampleRequest {
                key: "d".into(),
                base_name: "d".into(),
                tags: BTreeMap::new(),
            },
            SampleRequest {
                key: "d{status:200}".into(),
                base_name: "d".into(),
                tags: [("status".to_string(), "200".to_string())].into(),
            },
        ];
        let s = collect_samples(data.as_bytes(), &reqs, 1000).unwrap();
        assert_eq!(s.sets["d"], vec![1.0, 3.0]);
        assert_eq!(s.sets["d{status:200}"], vec![3.0]);
        assert_eq!(s.bad_lines, 2);
        // The cut-short last line names `d`, so its sets are not trusted as complete.
        assert!(s.complete("d", "d").is_none());
    }
}
