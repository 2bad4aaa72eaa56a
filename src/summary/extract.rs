//! From a normalised [`Summary`] to the rows k6-ingest stores: the `k6_performance_runs`
//! columns and the per-metric, per-threshold and per-check detail rows.
//!
//! Pure: no I/O, no clock. A value k6 did not report stays `None` (NULL); a value that
//! cannot be stored becomes `None` with a warning saying why.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::model::{Contains, Metric, MetricType, Summary};
use super::samples::{SampleRequest, SampleSets, SampleStats};
use super::scale::{self, history_scale};
use super::selector::{percentile_of, threshold_aggregation};
use super::status::{RunStatus, exit_code_meaning, status_for};

/// The extracted `k6_performance_runs` columns, serialised keyed by column name.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PerformanceColumns {
    pub status: RunStatus,
    pub duration_ms: Option<i64>,
    pub total_requests: Option<i64>,
    pub failed_requests: Option<i64>,
    pub request_rate: Option<i64>,
    pub avg_response_time_ms: Option<i64>,
    pub p50_response_time_ms: Option<i64>,
    pub p90_response_time_ms: Option<i64>,
    pub p95_response_time_ms: Option<i64>,
    pub p99_response_time_ms: Option<i64>,
    pub min_response_time_ms: Option<i64>,
    pub max_response_time_ms: Option<i64>,
    pub thresholds_passed: Option<bool>,
    pub thresholds_total: Option<i32>,
    pub thresholds_failed: Option<i32>,
    pub checks_total: Option<i64>,
    pub checks_passed: Option<i64>,
    pub checks_failed: Option<i64>,
    pub vus_max: Option<i64>,
    pub iterations_total: Option<i64>,
    pub iterations_rate: Option<i64>,
    pub data_received_bytes: Option<i64>,
    pub data_sent_bytes: Option<i64>,
    pub exit_code: Option<i32>,
    pub summary_format: Option<&'static str>,
    /// Where derived values came from when not straight from the summary.
    pub value_sources: BTreeMap<String, String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MetricRow {
    pub metric_name: String,
    pub base_name: String,
    pub metric_type: Option<&'static str>,
    pub contains: Option<&'static str>,
    pub tags: BTreeMap<String, String>,
    pub scale: i32,
    pub value: Option<i64>,
    pub count: Option<i64>,
    pub rate: Option<i64>,
    pub rate_scale: Option<i32>,
    pub passes: Option<i64>,
    pub fails: Option<i64>,
    pub min_value: Option<i64>,
    pub max_value: Option<i64>,
    pub avg_value: Option<i64>,
    pub med_value: Option<i64>,
    pub p90_value: Option<i64>,
    pub p95_value: Option<i64>,
    pub p99_value: Option<i64>,
    pub percentiles: BTreeMap<String, i64>,
    pub raw_values: BTreeMap<String, Option<f64>>,
    pub sources: BTreeMap<String, String>,
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ThresholdRow {
    pub metric_name: String,
    pub base_name: String,
    pub tags: BTreeMap<String, String>,
    pub expression: String,
    pub ok: bool,
    pub aggregation: Option<String>,
    pub observed_value: Option<i64>,
    pub observed_scale: Option<i32>,
    pub observed_raw: Option<f64>,
    pub observed_source: Option<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckRow {
    pub position: i32,
    pub group_path: Vec<String>,
    pub path: String,
    pub name: String,
    pub passes: Option<i64>,
    pub fails: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Extraction {
    pub columns: PerformanceColumns,
    /// The reason behind a status other than `passed`, for `runs.error_details`.
    pub status_details: Option<String>,
    pub metrics: Vec<MetricRow>,
    pub thresholds: Vec<ThresholdRow>,
    pub checks: Vec<CheckRow>,
}

/// The response-time metric behind every `*_response_time_ms` column.
const DURATION: &str = "http_req_duration";
const RESPONSE_PERCENTILES: [(&str, f64); 3] = [("p(50)", 50.0), ("p(90)", 90.0), ("p(99)", 99.0)];

/// The metric keys whose raw samples would fill a gap: percentiles the run's columns or
/// thresholds need but the summary did not report.
pub fn wanted_samples(summary: &Summary) -> Vec<SampleRequest> {
    let mut out: Vec<SampleRequest> = Vec::new();
    let mut want = |m: &Metric| {
        if !out.iter().any(|r| r.key == m.name) {
            out.push(SampleRequest {
                key: m.name.clone(),
                base_name: m.base_name.clone(),
                tags: m.tags.clone(),
                percentiles: sample_percentiles(m),
            });
        }
    };
    if let Some(d) = summary.metric(DURATION) {
        let missing = RESPONSE_PERCENTILES
            .iter()
            .any(|(k, _)| d.value(k).is_none() && !(*k == "p(50)" && d.value("med").is_some()));
        if missing || d.value("p(95)").is_none() {
            want(d);
        }
    }
    for m in &summary.metrics {
        if m.metric_type != Some(MetricType::Trend) {
            continue;
        }
        for t in &m.thresholds {
            if let Some(agg) = threshold_aggregation(&t.expression) {
                if percentile_of(&agg).is_some() && m.value(&agg).is_none() {
                    want(m);
                }
            }
        }
    }
    out
}

/// Every percentile extraction may take from a metric's samples: the columns' and rows'
/// p(50)/p(90)/p(95)/p(99), and each p(N) the summary reports or a threshold judges (to
/// verify the samples against, or to fill in).
fn sample_percentiles(m: &Metric) -> Vec<f64> {
    let mut ps = vec![50.0, 90.0, 95.0, 99.0];
    let stats = m.values.keys().cloned();
    let judged = m
        .thresholds
        .iter()
        .filter_map(|t| threshold_aggregation(&t.expression));
    for p in stats.chain(judged).filter_map(|k| percentile_of(&k)) {
        if !ps.iter().any(|q: &f64| q.to_bits() == p.to_bits()) {
            ps.push(p);
        }
    }
    ps
}

/// Trend samples for a metric, if complete and consistent with what the summary says.
///
/// Samples are only trusted when they reproduce every order statistic the summary did
/// report (count, min, max, med and each p(N)): a partial or foreign samples file then
/// cannot slip wrong numbers into the row.
fn trusted_samples<'a>(
    m: &Metric,
    samples: Option<&'a SampleSets>,
    warnings: &mut Vec<String>,
) -> Option<&'a SampleStats> {
    let s = samples?.complete(&m.name, &m.base_name)?;
    if s.is_empty() {
        return None;
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
    let mut checks: Vec<(String, f64, f64)> = Vec::new();
    if let Some(c) = m.value("count") {
        checks.push(("count".into(), c, s.count as f64));
    }
    if let Some(v) = m.value("min") {
        checks.push(("min".into(), v, s.min));
    }
    if let Some(v) = m.value("max") {
        checks.push(("max".into(), v, s.max));
    }
    if let Some(v) = m.value("med") {
        checks.push(("med".into(), v, s.percentile(50.0)?));
    }
    for (k, v) in &m.values {
        if let (Some(p), Some(v)) = (percentile_of(k), v) {
            checks.push((k.clone(), *v, s.percentile(p)?));
        }
    }
    if checks.is_empty() {
        warnings.push(format!(
            "{}: raw samples not used, the summary reports no stat to verify them against",
            m.name
        ));
        return None;
    }
    for (stat, want, got) in &checks {
        if !close(*want, *got) {
            warnings.push(format!(
                "{}: raw samples not used, they give {stat}={got} where the summary says {want}",
                m.name
            ));
            return None;
        }
    }
    Some(s)
}

fn scaled_or_warn(
    value: Option<f64>,
    factor: f64,
    what: &str,
    warnings: &mut Vec<String>,
) -> Option<i64> {
    let v = value?;
    let out = scale::scaled(v, factor);
    if out.is_none() {
        warnings.push(format!(
            "{what}: {} does not fit the scale ×{factor}, stored NULL",
            short(v)
        ));
    }
    out
}

fn count_or_warn(value: Option<f64>, what: &str, warnings: &mut Vec<String>) -> Option<i64> {
    let v = value?;
    let out = scale::count(v);
    if out.is_none() {
        warnings.push(format!(
            "{what}: {} is not a storable count, stored NULL",
            short(v)
        ));
    }
    out
}

/// A number for a warning: exponent form when the plain form would be unreadable.
fn short(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e15 || v.abs() < 1e-6) {
        format!("{v:e}")
    } else {
        v.to_string()
    }
}

/// Drops repeated warnings, keeping the first occurrence's order.
fn dedup_keep_order(warnings: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    warnings.retain(|w| seen.insert(w.clone()));
}

fn null_warnings(m: &Metric, warnings: &mut Vec<String>) {
    for (k, v) in &m.values {
        if v.is_none() {
            warnings.push(format!(
                "{}: k6 reported {k} as null (non-finite), stored NULL",
                m.name
            ));
        }
    }
}

/// Extracts everything from a summary. `samples` may fill percentiles the summary lacks.
pub fn extract(
    summary: &Summary,
    exit_code: Option<i32>,
    samples: Option<&SampleSets>,
) -> Extraction {
    let mut warnings: Vec<String> = summary.warnings.clone();
    let mut sources = BTreeMap::new();

    let metrics: Vec<MetricRow> = summary
        .metrics
        .iter()
        .map(|m| metric_row(m, samples, summary.derived.get(&m.name)))
        .collect();
    for row in &metrics {
        warnings.extend(row.warnings.iter().cloned());
    }

    // --- HTTP totals and response times ---
    let reqs = summary.metric("http_reqs");
    let total_requests = count_or_warn(
        reqs.and_then(|m| m.value("count")),
        "http_reqs count",
        &mut warnings,
    );
    let request_rate = scaled_or_warn(
        reqs.and_then(|m| m.value("rate")),
        scale::PER_SECOND_X100,
        "http_reqs rate",
        &mut warnings,
    );
    if summary.is_derived("http_reqs", "rate") && request_rate.is_some() {
        sources.insert("request_rate".into(), "derived".into());
    }
    // http_req_failed counts a failed request as a *pass* of the rate.
    let failed_requests = count_or_warn(
        summary
            .metric("http_req_failed")
            .and_then(|m| m.value("passes")),
        "http_req_failed passes",
        &mut warnings,
    );

    let duration = summary.metric(DURATION);
    let mut dwarn = Vec::new();
    let dsamples = duration.and_then(|d| trusted_samples(d, samples, &mut dwarn));
    warnings.extend(dwarn);
    let mut response =
        |stat: &str, p: Option<f64>, column: &str, warnings: &mut Vec<String>| -> Option<i64> {
            let d = duration?;
            let from_summary = d.value(stat).or_else(|| {
                if stat == "p(50)" {
                    d.value("med")
                } else {
                    None
                }
            });
            let value = match (from_summary, p, dsamples) {
                (Some(v), _, _) => Some(v),
                (None, Some(p), Some(s)) if !d.values.contains_key(stat) => {
                    sources.insert(column.to_string(), "samples".to_string());
                    s.percentile(p)
                }
                _ => None,
            };
            scaled_or_warn(value, scale::MS, &format!("{DURATION} {stat}"), warnings)
        };
    let avg = response("avg", None, "avg_response_time_ms", &mut warnings);
    let p50 = response("p(50)", Some(50.0), "p50_response_time_ms", &mut warnings);
    let p90 = response("p(90)", Some(90.0), "p90_response_time_ms", &mut warnings);
    let p95 = response("p(95)", Some(95.0), "p95_response_time_ms", &mut warnings);
    let p99 = response("p(99)", Some(99.0), "p99_response_time_ms", &mut warnings);
    let min = response("min", None, "min_response_time_ms", &mut warnings);
    let max = response("max", None, "max_response_time_ms", &mut warnings);

    // --- thresholds ---
    let thresholds: Vec<ThresholdRow> = summary
        .metrics
        .iter()
        .flat_map(|m| m.thresholds.iter().map(move |t| (m, t)))
        .map(|(m, t)| threshold_row(m, &t.expression, t.ok, samples))
        .collect();
    let carries_thresholds = summary.format != super::model::SummaryFormat::MachineReadable;
    let failed: Vec<&ThresholdRow> = thresholds.iter().filter(|t| !t.ok).collect();
    let (thresholds_total, thresholds_failed, thresholds_passed) = if carries_thresholds {
        let total = i32::try_from(thresholds.len()).unwrap_or(i32::MAX);
        let nfailed = i32::try_from(failed.len()).unwrap_or(i32::MAX);
        (
            Some(total),
            Some(nfailed),
            (total > 0).then_some(nfailed == 0),
        )
    } else {
        (None, None, None)
    };

    // --- checks: the `checks` rate equals the sum over the tree; fall back to the tree ---
    let checks: Vec<CheckRow> = summary
        .checks
        .iter()
        .enumerate()
        .map(|(i, c)| CheckRow {
            position: i32::try_from(i).unwrap_or(i32::MAX),
            group_path: c.group_path.clone(),
            path: c.path.clone(),
            name: c.name.clone(),
            passes: count_or_warn(
                c.passes,
                &format!("check {:?} passes", c.path),
                &mut warnings,
            ),
            fails: count_or_warn(c.fails, &format!("check {:?} fails", c.path), &mut warnings),
        })
        .collect();
    let (checks_passed, checks_failed) = match summary.metric("checks") {
        Some(m) => (
            count_or_warn(m.value("passes"), "checks passes", &mut warnings),
            count_or_warn(m.value("fails"), "checks fails", &mut warnings),
        ),
        // The machine-readable format has no `checks` rate but two rates whose matches
        // are the successful and the failed checks.
        None if summary.format == super::model::SummaryFormat::MachineReadable
            && summary.metric("checks_succeeded").is_some()
            && summary.metric("checks_failed").is_some() =>
        {
            let matches = |name: &str| summary.metric(name).and_then(|m| m.value("matches"));
            (
                count_or_warn(
                    matches("checks_succeeded"),
                    "checks_succeeded matches",
                    &mut warnings,
                ),
                count_or_warn(
                    matches("checks_failed"),
                    "checks_failed matches",
                    &mut warnings,
                ),
            )
        }
        None if !checks.is_empty() => {
            sources.insert("checks_total".into(), "check_tree".into());
            (
                checks.iter().map(|c| c.passes).sum::<Option<i64>>(),
                checks.iter().map(|c| c.fails).sum::<Option<i64>>(),
            )
        }
        None => (None, None),
    };
    let checks_total = checks_passed
        .zip(checks_failed)
        .and_then(|(p, f)| p.checked_add(f));

    // --- execution ---
    let vus_max = summary
        .metric("vus_max")
        .and_then(|m| m.value("value").or(m.value("max")))
        .or_else(|| summary.metric("vus").and_then(|m| m.value("max")));
    let vus_max = count_or_warn(vus_max, "vus_max", &mut warnings);
    let iterations = summary.metric("iterations");
    let iterations_total = count_or_warn(
        iterations.and_then(|m| m.value("count")),
        "iterations count",
        &mut warnings,
    );
    let iterations_rate = scaled_or_warn(
        iterations.and_then(|m| m.value("rate")),
        scale::PER_SECOND_X100,
        "iterations rate",
        &mut warnings,
    );
    if summary.is_derived("iterations", "rate") && iterations_rate.is_some() {
        sources.insert("iterations_rate".into(), "derived".into());
    }
    let data_received_bytes = count_or_warn(
        summary
            .metric("data_received")
            .and_then(|m| m.value("count")),
        "data_received count",
        &mut warnings,
    );
    let data_sent_bytes = count_or_warn(
        summary.metric("data_sent").and_then(|m| m.value("count")),
        "data_sent count",
        &mut warnings,
    );
    let duration_ms = count_or_warn(
        summary.test_run_duration_ms,
        "state.testRunDurationMs",
        &mut warnings,
    );

    let status = status_for(!failed.is_empty(), exit_code, true);
    let status_details = describe_status(status, exit_code, &failed);

    dedup_keep_order(&mut warnings);
    Extraction {
        columns: PerformanceColumns {
            status,
            duration_ms,
            total_requests,
            failed_requests,
            request_rate,
            avg_response_time_ms: avg,
            p50_response_time_ms: p50,
            p90_response_time_ms: p90,
            p95_response_time_ms: p95,
            p99_response_time_ms: p99,
            min_response_time_ms: min,
            max_response_time_ms: max,
            thresholds_passed,
            thresholds_total,
            thresholds_failed,
            checks_total,
            checks_passed,
            checks_failed,
            vus_max,
            iterations_total,
            iterations_rate,
            data_received_bytes,
            data_sent_bytes,
            exit_code,
            summary_format: Some(summary.format.as_str()),
            value_sources: sources,
            warnings,
        },
        status_details,
        metrics,
        thresholds,
        checks,
    }
}

/// The columns of a run that has no usable summary: status `error`, every metric NULL.
pub fn extract_without_summary(exit_code: Option<i32>, reason: &str) -> Extraction {
    let status = RunStatus::Error;
    let detail = match exit_code {
        Some(code) => format!(
            "{reason} (k6 exit code {code}: {})",
            exit_code_meaning(code)
        ),
        None => reason.to_string(),
    };
    Extraction {
        columns: PerformanceColumns {
            status,
            duration_ms: None,
            total_requests: None,
            failed_requests: None,
            request_rate: None,
            avg_response_time_ms: None,
            p50_response_time_ms: None,
            p90_response_time_ms: None,
            p95_response_time_ms: None,
            p99_response_time_ms: None,
            min_response_time_ms: None,
            max_response_time_ms: None,
            thresholds_passed: None,
            thresholds_total: None,
            thresholds_failed: None,
            checks_total: None,
            checks_passed: None,
            checks_failed: None,
            vus_max: None,
            iterations_total: None,
            iterations_rate: None,
            data_received_bytes: None,
            data_sent_bytes: None,
            exit_code,
            summary_format: None,
            value_sources: BTreeMap::new(),
            warnings: vec![detail.clone()],
        },
        status_details: Some(detail),
        metrics: Vec::new(),
        thresholds: Vec::new(),
        checks: Vec::new(),
    }
}

fn describe_status(
    status: RunStatus,
    exit_code: Option<i32>,
    failed: &[&ThresholdRow],
) -> Option<String> {
    let code = exit_code.map(|c| format!("k6 exit code {c}: {}", exit_code_meaning(c)));
    match status {
        RunStatus::Passed => None,
        RunStatus::Failed if !failed.is_empty() => {
            let list: Vec<String> = failed
                .iter()
                .map(|t| format!("{} {}", t.metric_name, t.expression))
                .collect();
            let mut s = format!("thresholds crossed: {}", list.join(", "));
            if let Some(code) = code {
                s.push_str(&format!(" ({code})"));
            }
            Some(s)
        }
        _ => code,
    }
}

/// `derived`: the stats of `m` that parsing computed rather than read (see
/// [`Summary::derived`]), marked as such in the row's sources.
fn metric_row(
    m: &Metric,
    samples: Option<&SampleSets>,
    derived: Option<&BTreeSet<String>>,
) -> MetricRow {
    let mut warnings = Vec::new();
    null_warnings(m, &mut warnings);
    let scale_i = history_scale(m.metric_type, m.contains);
    let factor = f64::from(scale_i);
    let mut sources = BTreeMap::new();
    let stat = |k: &str, w: &mut Vec<String>| {
        scaled_or_warn(m.value(k), factor, &format!("{} {k}", m.name), w)
    };

    let mut row = MetricRow {
        metric_name: m.name.clone(),
        base_name: m.base_name.clone(),
        metric_type: m.metric_type.map(MetricType::as_str),
        contains: m.contains.map(Contains::as_str),
        tags: m.tags.clone(),
        scale: scale_i,
        value: None,
        count: None,
        rate: None,
        rate_scale: None,
        passes: None,
        fails: None,
        min_value: None,
        max_value: None,
        avg_value: None,
        med_value: None,
        p90_value: None,
        p95_value: None,
        p99_value: None,
        percentiles: BTreeMap::new(),
        raw_values: m.values.clone(),
        sources: BTreeMap::new(),
        warnings: Vec::new(),
    };
    match m.metric_type {
        Some(MetricType::Counter) => {
            row.value = stat("count", &mut warnings);
            row.rate = stat("rate", &mut warnings);
            row.rate_scale = Some(scale_i);
        }
        Some(MetricType::Gauge) => {
            row.value = stat("value", &mut warnings);
            row.min_value = stat("min", &mut warnings);
            row.max_value = stat("max", &mut warnings);
        }
        Some(MetricType::Rate) => {
            row.rate = stat("rate", &mut warnings);
            row.rate_scale = Some(scale_i);
            row.passes = count_or_warn(
                m.value("passes"),
                &format!("{} passes", m.name),
                &mut warnings,
            );
            row.fails = count_or_warn(
                m.value("fails"),
                &format!("{} fails", m.name),
                &mut warnings,
            );
            row.count = row
                .passes
                .zip(row.fails)
                .and_then(|(p, f)| p.checked_add(f));
        }
        Some(MetricType::Trend) | None => {
            row.count = count_or_warn(
                m.value("count"),
                &format!("{} count", m.name),
                &mut warnings,
            );
            row.min_value = stat("min", &mut warnings);
            row.max_value = stat("max", &mut warnings);
            row.avg_value = stat("avg", &mut warnings);
            row.med_value = stat("med", &mut warnings);
            for (k, v) in &m.values {
                if percentile_of(k).is_some() {
                    if let Some(x) =
                        scaled_or_warn(*v, factor, &format!("{} {k}", m.name), &mut warnings)
                    {
                        row.percentiles.insert(k.clone(), x);
                    }
                }
            }
            let trusted = trusted_samples(m, samples, &mut warnings);
            for (key, p) in [("p(90)", 90.0), ("p(95)", 95.0), ("p(99)", 99.0)] {
                let v = match (m.value(key), trusted) {
                    (Some(v), _) => Some(v),
                    (None, Some(s)) if !m.values.contains_key(key) => {
                        sources.insert(key.to_string(), "samples".to_string());
                        s.percentile(p)
                    }
                    _ => None,
                };
                let scaled = scaled_or_warn(v, factor, &format!("{} {key}", m.name), &mut warnings);
                match key {
                    "p(90)" => row.p90_value = scaled,
                    "p(95)" => row.p95_value = scaled,
                    _ => row.p99_value = scaled,
                }
            }
        }
    }
    for stat in derived.into_iter().flatten() {
        sources.insert(stat.clone(), "derived".to_string());
    }
    dedup_keep_order(&mut warnings);
    row.sources = sources;
    row.warnings = warnings;
    row
}

/// The value a threshold was judged on, where the summary (or the samples) has it.
fn threshold_row(
    m: &Metric,
    expression: &str,
    ok: bool,
    samples: Option<&SampleSets>,
) -> ThresholdRow {
    let aggregation = threshold_aggregation(expression);
    let scale_i = history_scale(m.metric_type, m.contains);
    let mut observed_raw = None;
    let mut source = None;
    if let Some(agg) = &aggregation {
        if let Some(v) = m.value(agg) {
            observed_raw = Some(v);
            source = Some("summary");
        } else if let Some(p) = percentile_of(agg) {
            let mut ignore = Vec::new();
            if let Some(v) = trusted_samples(m, samples, &mut ignore).and_then(|s| s.percentile(p))
            {
                observed_raw = Some(v);
                source = Some("samples");
            }
        }
    }
    let observed_value = observed_raw.and_then(|v| scale::scaled(v, f64::from(scale_i)));
    ThresholdRow {
        metric_name: m.name.clone(),
        base_name: m.base_name.clone(),
        tags: m.tags.clone(),
        expression: expression.to_string(),
        ok,
        aggregation,
        observed_value,
        observed_scale: observed_value.map(|_| scale_i),
        observed_raw,
        observed_source: source,
    }
}
