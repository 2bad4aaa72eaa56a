//! Detects which summary format a document is and normalises it into [`Summary`].
//!
//! Every number goes through `f64`: k6 writes JavaScript numbers, so integers beyond
//! 2^64 (`100000000000000000000`), exponents and `null` for non-finite values all occur.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value};

use super::model::{Check, Contains, Metric, MetricType, Summary, SummaryFormat, Threshold};
use super::selector::{parse_metric_key, percentile_of};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SummaryError {
    #[error("summary is not valid JSON: {0}")]
    Json(String),
    #[error("summary is not a k6 summary: {0}")]
    NotASummary(String),
    #[error("unsupported machine-readable summary version {0:?} (supported: 1.x)")]
    UnsupportedVersion(String),
    /// Above a size cap (see `summary::limits`): refused whole, never cut.
    #[error("summary is too large: {0}")]
    TooLarge(String),
}

/// Parses summary bytes of any supported format.
pub fn parse_summary(bytes: &[u8]) -> Result<Summary, SummaryError> {
    let doc: Value =
        serde_json::from_slice(bytes).map_err(|e| SummaryError::Json(e.to_string()))?;
    parse_summary_value(&doc)
}

pub fn parse_summary_value(doc: &Value) -> Result<Summary, SummaryError> {
    let obj = doc.as_object().ok_or_else(|| {
        SummaryError::NotASummary(format!("top level is {}, not an object", kind(doc)))
    })?;
    match detect(obj)? {
        SummaryFormat::HandleSummary => parse_handle_summary(obj),
        SummaryFormat::LegacyExport => parse_legacy(obj),
        SummaryFormat::MachineReadable => parse_machine_readable(obj),
    }
}

/// [`parse_summary_value`] consuming the document: a handleSummary document's metrics
/// (nearly all of a large one) are converted one at a time, each one's JSON tree freed
/// as soon as it is converted, so the document and the summary are never both whole in
/// memory. Used where several large summaries are parsed one after another (a split
/// run's merge). The result is the same as [`parse_summary_value`]'s.
pub fn parse_summary_owned(doc: Value) -> Result<Summary, SummaryError> {
    match doc {
        Value::Object(obj) if detect(&obj)? == SummaryFormat::HandleSummary => {
            parse_handle_summary_owned(obj)
        }
        doc => parse_summary_value(&doc),
    }
}

/// Decides the format from the document's shape alone.
pub fn detect(obj: &Map<String, Value>) -> Result<SummaryFormat, SummaryError> {
    if let Some(version) = obj.get("version") {
        if obj.contains_key("results") {
            let v = version.as_str().unwrap_or_default();
            if v.split('.').next() != Some("1") {
                return Err(SummaryError::UnsupportedVersion(version.to_string()));
            }
            return Ok(SummaryFormat::MachineReadable);
        }
    }
    let metrics = match obj.get("metrics") {
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err(SummaryError::NotASummary(format!(
                "`metrics` is {}, not an object",
                kind(other)
            )));
        }
        None => {
            return Err(SummaryError::NotASummary(
                "no `metrics` object and no machine-readable `version`/`results`".into(),
            ));
        }
    };
    let typed = metrics.values().any(|m| {
        m.get("type").is_some_and(Value::is_string) && m.get("values").is_some_and(Value::is_object)
    });
    if typed || (metrics.is_empty() && (obj.contains_key("state") || obj.contains_key("options"))) {
        Ok(SummaryFormat::HandleSummary)
    } else {
        Ok(SummaryFormat::LegacyExport)
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The value at a path of object keys.
fn at<'a>(obj: &'a Map<String, Value>, path: &[&str]) -> Option<&'a Value> {
    let (first, rest) = path.split_first()?;
    rest.iter().try_fold(obj.get(*first)?, |v, k| v.get(*k))
}

/// A JSON number as a finite f64; `null`, strings and non-finite values give `None`.
fn number(v: &Value) -> Option<f64> {
    v.as_f64().filter(|f| f.is_finite())
}

fn values_map(
    obj: &Map<String, Value>,
    skip: &[&str],
    warnings: &mut Vec<String>,
    metric: &str,
) -> BTreeMap<String, Option<f64>> {
    let mut out = BTreeMap::new();
    for (k, v) in obj {
        if skip.contains(&k.as_str()) {
            continue;
        }
        match v {
            Value::Number(_) | Value::Null => {
                out.insert(k.clone(), number(v));
            }
            other => warnings.push(format!("{metric}: stat {k:?} is {}, ignored", kind(other))),
        }
    }
    out
}

fn finish(
    mut metrics: Vec<Metric>,
    format: SummaryFormat,
    duration: Option<f64>,
    trend_stats: Option<Vec<String>>,
    checks: Vec<Check>,
    warnings: Vec<String>,
) -> Summary {
    // Stable: metrics listed twice keep their document order, and the last one wins.
    metrics.sort_by(|a, b| a.name.cmp(&b.name));
    let mut warnings = warnings;
    let mut kept: Vec<Metric> = Vec::with_capacity(metrics.len());
    for m in metrics {
        if let Some(prev) = kept.last_mut().filter(|p| p.name == m.name) {
            warnings.push(format!(
                "{}: metric listed more than once; the last occurrence is kept",
                m.name
            ));
            *prev = m;
        } else {
            kept.push(m);
        }
    }
    let mut metrics = kept;
    for m in &mut metrics {
        dedup_thresholds(m, &mut warnings);
    }
    Summary {
        format,
        test_run_duration_ms: duration,
        trend_stats,
        metrics,
        checks,
        warnings,
        derived: BTreeMap::new(),
    }
}

/// One threshold per expression and metric: the last occurrence wins, with a warning
/// (the database keeps one result per metric and expression).
fn dedup_thresholds(m: &mut Metric, warnings: &mut Vec<String>) {
    let mut kept: Vec<Threshold> = Vec::with_capacity(m.thresholds.len());
    for t in std::mem::take(&mut m.thresholds) {
        if let Some(prev) = kept.iter_mut().find(|p| p.expression == t.expression) {
            warnings.push(format!(
                "{}: threshold {:?} listed more than once; the last occurrence is kept",
                m.name, t.expression
            ));
            *prev = t;
        } else {
            kept.push(t);
        }
    }
    m.thresholds = kept;
}

fn parse_handle_summary(obj: &Map<String, Value>) -> Result<Summary, SummaryError> {
    let mut warnings = Vec::new();
    let metrics = metric_objects(obj, &mut warnings)
        .into_iter()
        .map(|(name, m)| handle_summary_metric(name, m, &mut warnings))
        .collect();
    Ok(handle_summary_rest(obj, metrics, warnings))
}

/// Like [`parse_handle_summary`] on a document it owns: each metric's JSON is freed as
/// soon as it is converted, so the tree and the summary are not both whole in memory.
fn parse_handle_summary_owned(mut obj: Map<String, Value>) -> Result<Summary, SummaryError> {
    let mut warnings = Vec::new();
    let mut metrics = Vec::new();
    if let Some(Value::Object(objs)) = obj.remove("metrics") {
        metrics.reserve(objs.len());
        for (name, m) in objs {
            match m.as_object() {
                Some(m) => metrics.push(handle_summary_metric(&name, m, &mut warnings)),
                None => warnings.push(format!("{name}: metric is {}, skipped", kind(&m))),
            }
        }
    }
    Ok(handle_summary_rest(&obj, metrics, warnings))
}

/// Everything of a handleSummary document but its metrics.
fn handle_summary_rest(
    obj: &Map<String, Value>,
    metrics: Vec<Metric>,
    mut warnings: Vec<String>,
) -> Summary {
    let duration = at(obj, &["state", "testRunDurationMs"]).and_then(number);
    let trend_stats = at(obj, &["options", "summaryTrendStats"])
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        });
    let checks = group_checks(obj, &mut warnings);
    finish(
        metrics,
        SummaryFormat::HandleSummary,
        duration,
        trend_stats,
        checks,
        warnings,
    )
}

/// The `metrics` object's entries that are objects; any other is skipped with a warning.
fn metric_objects<'a>(
    obj: &'a Map<String, Value>,
    warnings: &mut Vec<String>,
) -> Vec<(&'a String, &'a Map<String, Value>)> {
    let Some(all) = obj.get("metrics").and_then(Value::as_object) else {
        return Vec::new();
    };
    all.iter()
        .filter_map(|(name, m)| match m.as_object() {
            Some(m) => Some((name, m)),
            None => {
                warnings.push(format!("{name}: metric is {}, skipped", kind(m)));
                None
            }
        })
        .collect()
}

/// The checks of the `root_group` tree, in k6's order.
fn group_checks(obj: &Map<String, Value>, warnings: &mut Vec<String>) -> Vec<Check> {
    let mut checks = Vec::new();
    if let Some(root) = obj.get("root_group") {
        walk_group(root, &mut Vec::new(), &mut checks, warnings, true);
    }
    checks
}

fn handle_summary_metric(name: &str, m: &Map<String, Value>, warnings: &mut Vec<String>) -> Metric {
    let (base_name, tags, metric_type, contains) = typed_key(name, m);
    let values = stat_values(name, m, warnings);
    let mut thresholds = Vec::new();
    for (expr, res) in m
        .get("thresholds")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        match res.get("ok").and_then(Value::as_bool) {
            Some(ok) => thresholds.push(Threshold {
                expression: expr.clone(),
                ok,
            }),
            None => warnings.push(format!(
                "{name}: threshold {expr:?} has no boolean `ok`, skipped"
            )),
        }
    }
    Metric {
        name: name.to_string(),
        base_name,
        tags,
        metric_type,
        contains,
        values,
        thresholds,
    }
}

/// A metric object's `values` (handleSummary and the machine-readable format both keep
/// the stats there).
fn stat_values(
    name: &str,
    m: &Map<String, Value>,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, Option<f64>> {
    m.get("values")
        .and_then(Value::as_object)
        .map(|v| values_map(v, &[], warnings, name))
        .unwrap_or_default()
}

/// A metric's key parsed into base name and tags, with the `type` and `contains` a
/// typed format declares.
fn typed_key(
    name: &str,
    m: &Map<String, Value>,
) -> (
    String,
    BTreeMap<String, String>,
    Option<MetricType>,
    Option<Contains>,
) {
    let (base_name, tags) = parse_metric_key(name);
    let metric_type = m
        .get("type")
        .and_then(Value::as_str)
        .and_then(MetricType::parse);
    let contains = m
        .get("contains")
        .and_then(Value::as_str)
        .and_then(Contains::parse);
    (base_name, tags, metric_type, contains)
}

/// Visits a group: its checks first, then its subgroups, each in the order k6 gave them.
/// Groups and checks are arrays in summary.json and name-keyed objects in the legacy
/// export; both are accepted. The root group contributes no name to the path.
fn walk_group(
    group: &Value,
    path: &mut Vec<String>,
    out: &mut Vec<Check>,
    warnings: &mut Vec<String>,
    is_root: bool,
) {
    let Some(g) = group.as_object() else {
        warnings.push(format!("group is {}, skipped", kind(group)));
        return;
    };
    if !is_root {
        path.push(
            g.get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        );
    }
    for check in children(g.get("checks")) {
        let Some(c) = check.as_object() else { continue };
        out.push(Check {
            group_path: path.clone(),
            path: c
                .get("path")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            name: c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            passes: c.get("passes").and_then(number),
            fails: c.get("fails").and_then(number),
        });
    }
    for sub in children(g.get("groups")) {
        walk_group(sub, path, out, warnings, false);
    }
    if !is_root {
        path.pop();
    }
}

fn children(v: Option<&Value>) -> Vec<&Value> {
    match v {
        Some(Value::Array(a)) => a.iter().collect(),
        Some(Value::Object(o)) => o.values().collect(),
        _ => Vec::new(),
    }
}

/// Built-in metrics whose unit the legacy export dropped but k6 documents.
fn builtin_contains(base: &str) -> Option<Contains> {
    match base {
        "data_sent" | "data_received" => Some(Contains::Data),
        "http_req_duration"
        | "http_req_blocked"
        | "http_req_connecting"
        | "http_req_tls_handshaking"
        | "http_req_sending"
        | "http_req_waiting"
        | "http_req_receiving"
        | "iteration_duration"
        | "group_duration"
        | "ws_connecting"
        | "ws_session_duration"
        | "ws_ping"
        | "grpc_req_duration" => Some(Contains::Time),
        "http_reqs" | "http_req_failed" | "iterations" | "dropped_iterations" | "vus"
        | "vus_max" | "checks" | "ws_msgs_sent" | "ws_msgs_received" | "ws_sessions" => {
            Some(Contains::Default)
        }
        _ => None,
    }
}

/// The legacy export drops `type`; the key set is the only evidence left.
fn infer_legacy_type(keys: &[&str]) -> MetricType {
    let has = |k: &str| keys.contains(&k);
    if keys.len() == 2 && has("count") && has("rate") {
        MetricType::Counter
    } else if keys.len() == 3 && has("value") && has("min") && has("max") {
        MetricType::Gauge
    } else if keys.len() == 3 && has("passes") && has("fails") && has("value") {
        MetricType::Rate
    } else {
        MetricType::Trend
    }
}

fn parse_legacy(obj: &Map<String, Value>) -> Result<Summary, SummaryError> {
    let mut warnings = Vec::new();
    let metrics = metric_objects(obj, &mut warnings)
        .into_iter()
        .map(|(name, m)| legacy_metric(name, m, &mut warnings))
        .collect();
    let checks = group_checks(obj, &mut warnings);
    Ok(finish(
        metrics,
        SummaryFormat::LegacyExport,
        None,
        None,
        checks,
        warnings,
    ))
}

/// The export carries no metric types: they are inferred from the stats present.
fn legacy_metric(name: &str, m: &Map<String, Value>, warnings: &mut Vec<String>) -> Metric {
    let (base_name, tags) = parse_metric_key(name);
    let keys: Vec<&str> = m
        .keys()
        .map(String::as_str)
        .filter(|k| *k != "thresholds")
        .collect();
    let metric_type = infer_legacy_type(&keys);
    let mut values = values_map(m, &["thresholds"], warnings, name);
    if metric_type == MetricType::Rate {
        if let Some(v) = values.remove("value") {
            values.insert("rate".into(), v);
        }
    }
    let mut thresholds = Vec::new();
    for (expr, failed) in m
        .get("thresholds")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        // In the export `true` means the threshold was crossed (failed).
        match failed.as_bool() {
            Some(failed) => thresholds.push(Threshold {
                expression: expr.clone(),
                ok: !failed,
            }),
            None => warnings.push(format!(
                "{name}: threshold {expr:?} is not a boolean, skipped"
            )),
        }
    }
    let contains = builtin_contains(&base_name);
    Metric {
        name: name.to_string(),
        base_name,
        tags,
        metric_type: Some(metric_type),
        contains,
        values,
        thresholds,
    }
}

/// A machine-readable trend stat key in the handleSummary spelling: k6 writes `p90`
/// and `p95` there where every other format has `p(90)` and `p(95)`.
fn machine_readable_stat(key: &str) -> String {
    match key.strip_prefix('p') {
        Some(n) if percentile_of(&format!("p({n})")).is_some() => format!("p({n})"),
        _ => key.to_string(),
    }
}

fn parse_machine_readable(obj: &Map<String, Value>) -> Result<Summary, SummaryError> {
    let mut warnings = Vec::new();
    let results = obj.get("results").and_then(Value::as_object);
    let listed = results
        .and_then(|r| r.get("metrics"))
        .and_then(Value::as_array);
    let check_metrics = results
        .and_then(|r| at(r, &["checks", "metrics"]))
        .and_then(Value::as_array);
    let mut metrics: Vec<Metric> = listed
        .into_iter()
        .flatten()
        .chain(check_metrics.into_iter().flatten())
        .filter_map(Value::as_object)
        .filter_map(|m| machine_readable_metric(m, &mut warnings))
        .collect();
    let duration = at(obj, &["config", "duration"])
        .and_then(number)
        .map(|s| s * 1000.0);
    let checks = machine_readable_checks(results, &mut warnings);
    let derived = derive_counter_rates(&mut metrics, duration);
    warnings.push(
        "machine-readable summary v1 carries no thresholds: thresholds_passed/total/failed stored NULL, and the status follows the exit code alone"
            .into(),
    );
    if metrics
        .iter()
        .any(|m| m.metric_type == Some(MetricType::Trend))
    {
        warnings.push(
            "machine-readable summary v1 ignores summaryTrendStats: trends carry avg, min, med, max, p(90), p(95) only (no count, no p(99) except from raw samples)"
                .into(),
        );
    }
    let mut summary = finish(
        metrics,
        SummaryFormat::MachineReadable,
        duration,
        None,
        checks,
        warnings,
    );
    summary.derived = derived;
    Ok(summary)
}

/// One entry of the machine-readable `metrics` list, its stats under k6's
/// handleSummary names (`p(90)`, `passes`/`fails`) so extraction reads every format alike.
fn machine_readable_metric(m: &Map<String, Value>, warnings: &mut Vec<String>) -> Option<Metric> {
    let Some(name) = m.get("name").and_then(Value::as_str) else {
        warnings.push("metric without a name, skipped".into());
        return None;
    };
    let (base_name, tags, metric_type, contains) = typed_key(name, m);
    let raw = stat_values(name, m, warnings);
    let mut values = BTreeMap::new();
    for (k, v) in raw {
        let stat = machine_readable_stat(&k);
        // k6 writes `p90`/`p95` as null when summaryTrendStats leaves them out: not
        // reported, rather than a non-finite value.
        if v.is_none() && percentile_of(&stat).is_some() {
            warnings.push(format!(
                "{name}: k6 wrote {k} as null (not computed: summaryTrendStats leaves it out), treated as not reported"
            ));
            continue;
        }
        values.insert(stat, v);
    }
    // Version 1 rates carry matches/total; keep k6's handleSummary names as well.
    if metric_type == Some(MetricType::Rate) {
        if let (Some(Some(matches)), Some(Some(total))) =
            (values.get("matches").copied(), values.get("total").copied())
        {
            values.insert("passes".into(), Some(matches));
            values.insert("fails".into(), Some(total - matches));
        }
    }
    Some(Metric {
        name: name.to_string(),
        base_name,
        tags,
        metric_type,
        contains,
        values,
        thresholds: Vec::new(),
    })
}

/// No group and no k6 path: the format lists checks flat, by name alone.
fn machine_readable_checks(
    results: Option<&Map<String, Value>>,
    warnings: &mut Vec<String>,
) -> Vec<Check> {
    let Some(list) = results
        .and_then(|r| at(r, &["checks", "results"]))
        .and_then(Value::as_array)
    else {
        return Vec::new();
    };
    let checks: Vec<Check> = list
        .iter()
        .map(|c| Check {
            group_path: Vec::new(),
            path: String::new(),
            name: c
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            passes: c.get("passes").and_then(number),
            fails: c.get("fails").and_then(number),
        })
        .collect();
    if !checks.is_empty() {
        warnings.push(
            "machine-readable summary v1 lists checks without their groups; k6 adds up same-named checks of different groups into one"
                .into(),
        );
    }
    checks
}

/// Counters in version 1 carry only `count`; k6's per-second `rate` is derived from the
/// test's duration, and each derived stat is named so the row can say so.
fn derive_counter_rates(
    metrics: &mut [Metric],
    duration_ms: Option<f64>,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut derived: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let Some(d) = duration_ms.filter(|d| *d > 0.0) else {
        return derived;
    };
    for m in metrics {
        if m.metric_type == Some(MetricType::Counter) && !m.values.contains_key("rate") {
            let rate = m.value("count").map(|c| c / (d / 1000.0));
            m.values.insert("rate".into(), rate);
            derived
                .entry(m.name.clone())
                .or_default()
                .insert("rate".into());
        }
    }
    derived
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn a_metric_listed_twice_keeps_the_last_occurrence() {
        let doc = br#"{"version":"1.0.0","config":{"duration":1},"results":{"checks":{"metrics":[
            {"name":"b","type":"counter","contains":"default","values":{"count":3}}]},
          "metrics":[
            {"name":"b","type":"counter","contains":"default","values":{"count":1}},
            {"name":"a","type":"gauge","contains":"default","values":{"value":1}},
            {"name":"b","type":"counter","contains":"default","values":{"count":2}}]}}"#;
        let s = parse_summary(doc).unwrap();
        let names: Vec<&str> = s.metrics.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(s.metric("b").unwrap().value("count"), Some(3.0));
        let dup: Vec<&String> = s
            .warnings
            .iter()
            .filter(|w| w.contains("listed more than once"))
            .collect();
        assert_eq!(dup.len(), 2, "{:?}", s.warnings);
    }

    #[test]
    fn a_threshold_listed_twice_keeps_the_last_occurrence() {
        let mut m = Metric {
            name: "m".into(),
            base_name: "m".into(),
            tags: BTreeMap::new(),
            metric_type: None,
            contains: None,
            values: BTreeMap::new(),
            thresholds: ["x<1", "y<1", "x<1"]
                .iter()
                .enumerate()
                .map(|(i, e)| Threshold {
                    expression: (*e).into(),
                    ok: i == 2,
                })
                .collect(),
        };
        let mut warnings = Vec::new();
        dedup_thresholds(&mut m, &mut warnings);
        let kept: Vec<(&str, bool)> = m
            .thresholds
            .iter()
            .map(|t| (t.expression.as_str(), t.ok))
            .collect();
        assert_eq!(kept, [("x<1", true), ("y<1", false)]);
        assert_eq!(warnings.len(), 1);
    }

    #[test]
    fn rejects_non_objects_and_garbage() {
        assert!(matches!(
            parse_summary(b"[1,2]"),
            Err(SummaryError::NotASummary(_))
        ));
        assert!(matches!(
            parse_summary(b"{\"a\":1}"),
            Err(SummaryError::NotASummary(_))
        ));
        assert!(matches!(
            parse_summary(b"{not json"),
            Err(SummaryError::Json(_))
        ));
        assert!(matches!(
            parse_summary(br#"{"version":"2.0.0","results":{}}"#),
            Err(SummaryError::UnsupportedVersion(_))
        ));
    }

    #[test]
    fn legacy_threshold_true_means_failed() {
        let s = parse_summary(
            br#"{"metrics":{"http_req_failed":{"passes":36,"fails":72,"value":0.33,"thresholds":{"rate<0.01":true}}}}"#,
        )
        .unwrap();
        assert_eq!(s.format, SummaryFormat::LegacyExport);
        let m = s.metric("http_req_failed").unwrap();
        assert_eq!(m.metric_type, Some(MetricType::Rate));
        assert_eq!(m.value("rate"), Some(0.33));
        assert!(!m.thresholds[0].ok);
    }

    #[test]
    fn machine_readable_percentiles_use_the_handle_summary_spelling() {
        let s = parse_summary(
            br#"{"version":"1.0.0","config":{"duration":2},"results":{"metrics":[
              {"name":"t","type":"trend","contains":"time","values":{"avg":1,"med":2,"p90":3,"p95":null,"p99.9":4}},
              {"name":"c","type":"counter","contains":"default","values":{"count":10}}]}}"#,
        )
        .unwrap();
        let t = s.metric("t").unwrap();
        assert_eq!(t.value("p(90)"), Some(3.0));
        assert_eq!(t.value("p(99.9)"), Some(4.0));
        assert!(!t.values.contains_key("p90") && !t.values.contains_key("p(95)"));
        assert!(s.warnings.iter().any(|w| w.contains("p95 as null")));
        assert_eq!(s.metric("c").unwrap().value("rate"), Some(5.0));
        assert!(s.is_derived("c", "rate"));
        assert!(!s.is_derived("c", "count"));
    }

    #[test]
    fn huge_integers_and_nulls() {
        let s = parse_summary(
            br#"{"metrics":{"c":{"type":"counter","contains":"default","values":{"count":100000000000000000000,"rate":null}}},"state":{"testRunDurationMs":1}}"#,
        )
        .unwrap();
        let m = s.metric("c").unwrap();
        assert_eq!(m.value("count"), Some(1e20));
        assert_eq!(m.values.get("rate"), Some(&None));
    }

    /// Every JSON summary file of the fixtures (whole runs and split parts, every k6
    /// version and format).
    pub(crate) fn fixture_summaries() -> Vec<std::path::PathBuf> {
        fn walk(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    walk(&path, out);
                } else if path.extension().is_some_and(|x| x == "json")
                    && path.file_name().is_some_and(|n| n != "message.json")
                {
                    out.push(path);
                }
            }
        }
        let mut out = Vec::new();
        walk(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
            &mut out,
        );
        out
    }

    #[test]
    fn parsing_a_document_it_owns_gives_the_same_summary() {
        let mut handle_summaries = 0;
        for path in fixture_summaries() {
            let Ok(doc) = serde_json::from_slice::<Value>(&std::fs::read(&path).unwrap()) else {
                continue;
            };
            let borrowed = parse_summary_value(&doc);
            let owned = parse_summary_owned(doc);
            if let Ok(s) = &borrowed {
                handle_summaries += usize::from(s.format == SummaryFormat::HandleSummary);
            }
            assert_eq!(
                format!("{owned:?}"),
                format!("{borrowed:?}"),
                "{}",
                path.display()
            );
        }
        assert!(handle_summaries > 10, "{handle_summaries}");
    }
}
