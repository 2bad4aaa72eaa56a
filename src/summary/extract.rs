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
    pub value_sources: BTreeMap<String, ValueSource>,
    pub warnings: Vec<String>,
}

/// Where a value came from when it was not read straight from the summary: the values
/// of `k6_performance_runs.value_sources` and of a metric row's `sources`, stored as
/// their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueSource {
    /// Computed by parsing from what the format carries (a counter's rate from its count
    /// and the test's duration).
    Derived,
    /// From the run's raw samples, which reproduce every stat the summary reported.
    Samples,
    /// The checks' totals summed over the check tree, for lack of a `checks` metric.
    CheckTree,
    /// How the merge of a split run arrived at the value, in words.
    Merge(String),
}

impl ValueSource {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Derived => "derived",
            Self::Samples => "samples",
            Self::CheckTree => "check_tree",
            Self::Merge(how) => how,
        }
    }
}

impl Serialize for ValueSource {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl PartialEq<&str> for ValueSource {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
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
    pub sources: BTreeMap<String, ValueSource>,
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
///
/// The steps run in a fixed order because the warnings keep it: the metric rows' own
/// warnings first, then the columns' in the order the table lists them.
pub fn extract(
    summary: &Summary,
    exit_code: Option<i32>,
    samples: Option<&SampleSets>,
) -> Extraction {
    let mut x = Extractor {
        summary,
        samples,
        warnings: summary.warnings.clone(),
        sources: BTreeMap::new(),
    };
    let metrics = x.metric_rows();
    let mut c = PerformanceColumns::empty(RunStatus::Passed, exit_code);
    c.summary_format = Some(summary.format.as_str());
    x.http_totals(&mut c);
    x.response_times(&mut c);
    let thresholds = x.threshold_rows(&mut c);
    let checks = x.check_rows(&mut c);
    x.execution(&mut c);

    let failed: Vec<&ThresholdRow> = thresholds.iter().filter(|t| !t.ok).collect();
    c.status = status_for(!failed.is_empty(), exit_code, true);
    let status_details = describe_status(c.status, exit_code, &failed);
    dedup_keep_order(&mut x.warnings);
    c.warnings = x.warnings;
    c.value_sources = x.sources;
    Extraction {
        columns: c,
        status_details,
        metrics,
        thresholds,
        checks,
    }
}

/// What every extraction step reads (the summary, the samples) and adds to (the
/// columns' warnings and value sources).
struct Extractor<'a> {
    summary: &'a Summary,
    samples: Option<&'a SampleSets>,
    warnings: Vec<String>,
    sources: BTreeMap<String, ValueSource>,
}

impl Extractor<'_> {
    fn metric(&self, name: &str) -> Option<&Metric> {
        self.summary.metric(name)
    }

    fn stat(&self, metric: &str, stat: &str) -> Option<f64> {
        self.metric(metric).and_then(|m| m.value(stat))
    }

    fn count(&mut self, value: Option<f64>, what: &str) -> Option<i64> {
        count_or_warn(value, what, &mut self.warnings)
    }

    /// A per-second rate, ×100; marked `derived` when parsing computed it (the
    /// machine-readable format reports counters without their rate).
    fn rate(&mut self, metric: &str, column: &str) -> Option<i64> {
        let rate = scaled_or_warn(
            self.stat(metric, "rate"),
            scale::PER_SECOND_X100,
            &format!("{metric} rate"),
            &mut self.warnings,
        );
        if self.summary.is_derived(metric, "rate") && rate.is_some() {
            self.sources.insert(column.into(), ValueSource::Derived);
        }
        rate
    }

    fn metric_rows(&mut self) -> Vec<MetricRow> {
        let summary = self.summary;
        let rows: Vec<MetricRow> = summary
            .metrics
            .iter()
            .map(|m| metric_row(m, self.samples, summary.derived.get(&m.name)))
            .collect();
        for row in &rows {
            self.warnings.extend(row.warnings.iter().cloned());
        }
        rows
    }

    fn http_totals(&mut self, c: &mut PerformanceColumns) {
        c.total_requests = self.count(self.stat("http_reqs", "count"), "http_reqs count");
        c.request_rate = self.rate("http_reqs", "request_rate");
        // http_req_failed counts a failed request as a *pass* of the rate.
        c.failed_requests = self.count(
            self.stat("http_req_failed", "passes"),
            "http_req_failed passes",
        );
    }

    /// The `*_response_time_ms` columns from `http_req_duration`; a percentile the
    /// summary lacks comes from trusted raw samples, and the column says so.
    fn response_times(&mut self, c: &mut PerformanceColumns) {
        let Some(d) = self.summary.metric(DURATION) else {
            return;
        };
        let samples = trusted_samples(d, self.samples, &mut self.warnings);
        let mut response = |stat: &str, p: Option<f64>, column: &str| -> Option<i64> {
            let from_summary = d
                .value(stat)
                .or_else(|| (stat == "p(50)").then(|| d.value("med")).flatten());
            let value = match (from_summary, p, samples) {
                (Some(v), _, _) => Some(v),
                (None, Some(p), Some(s)) if !d.values.contains_key(stat) => {
                    self.sources
                        .insert(column.to_string(), ValueSource::Samples);
                    s.percentile(p)
                }
                _ => None,
            };
            scaled_or_warn(
                value,
                scale::MS,
                &format!("{DURATION} {stat}"),
                &mut self.warnings,
            )
        };
        c.avg_response_time_ms = response("avg", None, "avg_response_time_ms");
        c.p50_response_time_ms = response("p(50)", Some(50.0), "p50_response_time_ms");
        c.p90_response_time_ms = response("p(90)", Some(90.0), "p90_response_time_ms");
        c.p95_response_time_ms = response("p(95)", Some(95.0), "p95_response_time_ms");
        c.p99_response_time_ms = response("p(99)", Some(99.0), "p99_response_time_ms");
        c.min_response_time_ms = response("min", None, "min_response_time_ms");
        c.max_response_time_ms = response("max", None, "max_response_time_ms");
    }

    /// One row per threshold with k6's own verdict. The machine-readable format carries
    /// no thresholds, so its totals stay unknown (NULL), not 0.
    fn threshold_rows(&mut self, c: &mut PerformanceColumns) -> Vec<ThresholdRow> {
        let samples = self.samples;
        let rows: Vec<ThresholdRow> = self
            .summary
            .metrics
            .iter()
            .flat_map(|m| m.thresholds.iter().map(move |t| (m, t)))
            .map(|(m, t)| threshold_row(m, &t.expression, t.ok, samples))
            .collect();
        if self.summary.format != super::model::SummaryFormat::MachineReadable {
            let total = i32::try_from(rows.len()).unwrap_or(i32::MAX);
            let failed = i32::try_from(rows.iter().filter(|t| !t.ok).count()).unwrap_or(i32::MAX);
            c.thresholds_total = Some(total);
            c.thresholds_failed = Some(failed);
            c.thresholds_passed = (total > 0).then_some(failed == 0);
        }
        rows
    }

    fn check_rows(&mut self, c: &mut PerformanceColumns) -> Vec<CheckRow> {
        let rows: Vec<CheckRow> = self
            .summary
            .checks
            .iter()
            .enumerate()
            .map(|(i, ch)| CheckRow {
                position: i32::try_from(i).unwrap_or(i32::MAX),
                group_path: ch.group_path.clone(),
                path: ch.path.clone(),
                name: ch.name.clone(),
                passes: self.count(ch.passes, &format!("check {:?} passes", ch.path)),
                fails: self.count(ch.fails, &format!("check {:?} fails", ch.path)),
            })
            .collect();
        (c.checks_passed, c.checks_failed) = self.check_totals(&rows);
        c.checks_total = c
            .checks_passed
            .zip(c.checks_failed)
            .and_then(|(p, f)| p.checked_add(f));
        rows
    }

    /// The `checks` rate equals the sum over the check tree; the tree is the fallback.
    fn check_totals(&mut self, rows: &[CheckRow]) -> (Option<i64>, Option<i64>) {
        let machine_readable = self.summary.format == super::model::SummaryFormat::MachineReadable;
        if self.metric("checks").is_some() {
            let passes = self.count(self.stat("checks", "passes"), "checks passes");
            let fails = self.count(self.stat("checks", "fails"), "checks fails");
            return (passes, fails);
        }
        // The machine-readable format has no `checks` rate but two rates whose matches
        // are the successful and the failed checks.
        if machine_readable
            && self.metric("checks_succeeded").is_some()
            && self.metric("checks_failed").is_some()
        {
            let passes = self.count(
                self.stat("checks_succeeded", "matches"),
                "checks_succeeded matches",
            );
            let fails = self.count(
                self.stat("checks_failed", "matches"),
                "checks_failed matches",
            );
            return (passes, fails);
        }
        if rows.is_empty() {
            return (None, None);
        }
        self.sources
            .insert("checks_total".into(), ValueSource::CheckTree);
        (
            rows.iter().map(|c| c.passes).sum::<Option<i64>>(),
            rows.iter().map(|c| c.fails).sum::<Option<i64>>(),
        )
    }

    fn execution(&mut self, c: &mut PerformanceColumns) {
        let vus_max = self
            .metric("vus_max")
            .and_then(|m| m.value("value").or(m.value("max")))
            .or_else(|| self.stat("vus", "max"));
        c.vus_max = self.count(vus_max, "vus_max");
        c.iterations_total = self.count(self.stat("iterations", "count"), "iterations count");
        c.iterations_rate = self.rate("iterations", "iterations_rate");
        c.data_received_bytes =
            self.count(self.stat("data_received", "count"), "data_received count");
        c.data_sent_bytes = self.count(self.stat("data_sent", "count"), "data_sent count");
        c.duration_ms = self.count(self.summary.test_run_duration_ms, "state.testRunDurationMs");
    }
}

impl PerformanceColumns {
    /// Every metric column NULL: the start of an extraction, and all of a run without
    /// a usable summary.
    fn empty(status: RunStatus, exit_code: Option<i32>) -> Self {
        Self {
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
            warnings: Vec::new(),
        }
    }
}

/// The columns of a run that has no usable summary: status `error`, every metric NULL.
pub fn extract_without_summary(exit_code: Option<i32>, reason: &str) -> Extraction {
    let detail = match exit_code {
        Some(code) => format!(
            "{reason} (k6 exit code {code}: {})",
            exit_code_meaning(code)
        ),
        None => reason.to_string(),
    };
    let mut columns = PerformanceColumns::empty(RunStatus::Error, exit_code);
    columns.warnings.push(detail.clone());
    Extraction {
        columns,
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
    let scale_i = history_scale(m.metric_type, m.contains);
    let mut b = RowBuilder {
        m,
        factor: f64::from(scale_i),
        warnings: Vec::new(),
        sources: BTreeMap::new(),
    };
    null_warnings(m, &mut b.warnings);
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
            row.value = b.stat("count");
            row.rate = b.stat("rate");
            row.rate_scale = Some(scale_i);
        }
        Some(MetricType::Gauge) => {
            row.value = b.stat("value");
            row.min_value = b.stat("min");
            row.max_value = b.stat("max");
        }
        Some(MetricType::Rate) => b.rate_stats(&mut row, scale_i),
        Some(MetricType::Trend) | None => b.trend_stats(&mut row, samples),
    }
    for stat in derived.into_iter().flatten() {
        b.sources.insert(stat.clone(), ValueSource::Derived);
    }
    dedup_keep_order(&mut b.warnings);
    row.sources = b.sources;
    row.warnings = b.warnings;
    row
}

/// One metric row's scaling, with the warnings and value sources it collects.
struct RowBuilder<'a> {
    m: &'a Metric,
    factor: f64,
    warnings: Vec<String>,
    sources: BTreeMap<String, ValueSource>,
}

impl RowBuilder<'_> {
    fn stat(&mut self, k: &str) -> Option<i64> {
        let what = format!("{} {k}", self.m.name);
        scaled_or_warn(self.m.value(k), self.factor, &what, &mut self.warnings)
    }

    fn count(&mut self, k: &str) -> Option<i64> {
        let what = format!("{} {k}", self.m.name);
        count_or_warn(self.m.value(k), &what, &mut self.warnings)
    }

    fn rate_stats(&mut self, row: &mut MetricRow, scale_i: i32) {
        row.rate = self.stat("rate");
        row.rate_scale = Some(scale_i);
        row.passes = self.count("passes");
        row.fails = self.count("fails");
        row.count = row
            .passes
            .zip(row.fails)
            .and_then(|(p, f)| p.checked_add(f));
    }

    /// A trend's stats, every p(N) it reports, and p(90)/p(95)/p(99) from trusted raw
    /// samples where the summary lacks them.
    fn trend_stats(&mut self, row: &mut MetricRow, samples: Option<&SampleSets>) {
        let m = self.m;
        row.count = self.count("count");
        row.min_value = self.stat("min");
        row.max_value = self.stat("max");
        row.avg_value = self.stat("avg");
        row.med_value = self.stat("med");
        for k in m.values.keys() {
            if percentile_of(k).is_some() {
                if let Some(x) = self.stat(k) {
                    row.percentiles.insert(k.clone(), x);
                }
            }
        }
        let trusted = trusted_samples(m, samples, &mut self.warnings);
        for (key, p) in [("p(90)", 90.0), ("p(95)", 95.0), ("p(99)", 99.0)] {
            let v = match (m.value(key), trusted) {
                (Some(v), _) => Some(v),
                (None, Some(s)) if !m.values.contains_key(key) => {
                    self.sources.insert(key.to_string(), ValueSource::Samples);
                    s.percentile(p)
                }
                _ => None,
            };
            let what = format!("{} {key}", m.name);
            let scaled = scaled_or_warn(v, self.factor, &what, &mut self.warnings);
            match key {
                "p(90)" => row.p90_value = scaled,
                "p(95)" => row.p95_value = scaled,
                _ => row.p99_value = scaled,
            }
        }
    }
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
