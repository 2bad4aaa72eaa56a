//! k6 2.x: its default summaries read like 1.1.0's, its machine-readable summary gives
//! the default summary's columns wherever it carries the information, and k6's own
//! threshold verdicts are reproduced by the threshold evaluator in every fixture.
//! Files only, no services.

mod harness;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use harness::*;
use k6_ingest::summary::threshold::evaluate_on_metric;
use k6_ingest::summary::{Extraction, SummaryFormat, ValueSource, parse_summary};
use serde_json::Value;

fn columns(e: &Extraction) -> serde_json::Map<String, Value> {
    match serde_json::to_value(&e.columns).unwrap() {
        Value::Object(o) => o,
        other => panic!("columns serialised as {other}"),
    }
}

/// The columns that hold a value (not NULL), without the bookkeeping ones.
fn present(e: &Extraction) -> BTreeSet<String> {
    columns(e)
        .into_iter()
        .filter(|(k, v)| {
            !v.is_null() && !["warnings", "value_sources", "summary_format"].contains(&k.as_str())
        })
        .map(|(k, _)| k)
        .collect()
}

/// Cases whose request, iteration and check counts the script fixes (iteration-based
/// executors, no random failures), so two runs of them agree on those counts.
const DETERMINISTIC: [&str; 3] = ["groups-nested-checks", "custom-metrics", "trend-stats"];

/// `-mr` and `-mr-full` runs, as (version, case without the suffix, full summary mode).
fn machine_readable_runs() -> Vec<(String, String, bool)> {
    all_fixture_runs()
        .into_iter()
        .filter_map(|(v, c)| {
            if let Some(base) = c.strip_suffix("-mr-full") {
                Some((v, base.to_string(), true))
            } else {
                c.strip_suffix("-mr")
                    .map(|base| (v, base.to_string(), false))
            }
        })
        .collect()
}

/// The HTTP timing metrics that the machine-readable summary lists only in k6's `full`
/// summary mode.
const HTTP_TIMINGS: [&str; 6] = [
    "http_req_blocked",
    "http_req_connecting",
    "http_req_tls_handshaking",
    "http_req_sending",
    "http_req_waiting",
    "http_req_receiving",
];

fn json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A metric's `values` object in a machine-readable file, read straight from the JSON.
fn mr_values<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    ["metrics", "checks"]
        .iter()
        .flat_map(|section| {
            let list = if *section == "metrics" {
                doc["results"]["metrics"].as_array()
            } else {
                doc["results"]["checks"]["metrics"].as_array()
            };
            list.into_iter().flatten()
        })
        .find(|m| m["name"] == name)
        .map(|m| &m["values"])
}

#[test]
fn machine_readable_runs_give_the_default_runs_columns() {
    let runs = machine_readable_runs();
    let cases: BTreeSet<&str> = runs
        .iter()
        .filter(|(_, _, full)| !full)
        .map(|(_, c, _)| c.as_str())
        .collect();
    for want in [
        "thresholds-pass",
        "thresholds-fail",
        "submetric-thresholds",
        "groups-nested-checks",
        "trend-stats",
        "custom-metrics",
        "scenarios",
        "interrupted",
    ] {
        assert!(cases.contains(want), "no -mr fixture for {want}: {runs:?}");
    }
    assert!(runs.iter().any(|(_, _, full)| *full), "no -mr-full fixture");
    for (version, case, full) in &runs {
        let suffix = if *full { "-mr-full" } else { "-mr" };
        let ctx = format!("{version}/{case}{suffix}");
        let mr_dir = fixture_dir(version, &format!("{case}{suffix}"));
        let default_dir = fixture_dir(version, case);
        let (mr, default) = (extract_fixture(&mr_dir), extract_fixture(&default_dir));
        let (mc, dc) = (&mr.columns, &default.columns);

        // Both files of the -mr run are the machine-readable format.
        for file in ["summary.json", "summary-export.json"] {
            let s = parse_summary(&std::fs::read(mr_dir.join(file)).unwrap()).unwrap();
            assert_eq!(s.format, SummaryFormat::MachineReadable, "{ctx} {file}");
            assert_eq!(json(&mr_dir.join(file))["version"], "1.0.0", "{ctx} {file}");
        }
        assert_eq!(mc.summary_format, Some("machine_readable_v1"), "{ctx}");
        assert_eq!(dc.summary_format, Some("handle_summary"), "{ctx}");
        assert_eq!(mc.exit_code, dc.exit_code, "{ctx}");

        // Structure: the same columns hold values, except what the format lacks.
        let mut expected = present(&default);
        let had_thresholds = dc.thresholds_total.unwrap() > 0;
        for k in ["thresholds_passed", "thresholds_total", "thresholds_failed"] {
            expected.remove(k);
        }
        assert_eq!(present(&mr), expected, "{ctx}: columns with a value");
        assert_eq!(
            (
                mc.thresholds_passed,
                mc.thresholds_total,
                mc.thresholds_failed
            ),
            (None, None, None),
            "{ctx}: thresholds unknown, not 0"
        );
        assert!(
            mc.warnings
                .iter()
                .any(|w| w.contains("carries no thresholds")),
            "{ctx}: the reason for NULL thresholds is kept: {:?}",
            mc.warnings
        );
        assert!(mr.thresholds.is_empty(), "{ctx}");
        assert_eq!(
            had_thresholds,
            !default.thresholds.is_empty(),
            "{ctx}: the default run's thresholds"
        );
        // Status: the same, except that a signal hides failed thresholds the
        // machine-readable format does not carry.
        if dc.exit_code == Some(105) {
            assert_eq!(dc.status.as_str(), "failed", "{ctx}");
            assert_eq!(mc.status.as_str(), "cancelled", "{ctx}");
        } else {
            assert_eq!(mc.status, dc.status, "{ctx}");
        }

        // Metrics: the same names, except k6's `checks` rate and its submetrics, which
        // this format replaces by checks_total / checks_succeeded / checks_failed,
        // `group_duration`, which it never lists (it has no groups), and the HTTP
        // timings, which it lists only in the `full` summary mode.
        let names = |e: &Extraction| {
            e.metrics
                .iter()
                .map(|m| m.metric_name.clone())
                .collect::<BTreeSet<_>>()
        };
        let mut want_names: BTreeSet<String> = default
            .metrics
            .iter()
            .filter(|m| {
                !["checks", "group_duration"].contains(&m.base_name.as_str())
                    && (*full || !HTTP_TIMINGS.contains(&m.base_name.as_str()))
            })
            .map(|m| m.metric_name.clone())
            .collect();
        if default.metrics.iter().any(|m| m.metric_name == "checks") {
            want_names
                .extend(["checks_total", "checks_succeeded", "checks_failed"].map(String::from));
        }
        assert_eq!(names(&mr), want_names, "{ctx}: metric names");
        for m in &mr.metrics {
            let d = default
                .metrics
                .iter()
                .find(|d| d.metric_name == m.metric_name);
            if let Some(d) = d {
                assert_eq!(
                    (m.metric_type, m.contains, &m.tags),
                    (d.metric_type, d.contains, &d.tags),
                    "{ctx} {}",
                    m.metric_name
                );
            }
        }

        // Checks: the same names; the same counts per name where the run fixes them.
        let by_name = |e: &Extraction| {
            let mut out: BTreeMap<String, (i64, i64)> = BTreeMap::new();
            for c in &e.checks {
                let entry = out.entry(c.name.clone()).or_default();
                entry.0 += c.passes.unwrap();
                entry.1 += c.fails.unwrap();
            }
            out
        };
        let (mr_checks, default_checks) = (by_name(&mr), by_name(&default));
        assert_eq!(
            mr_checks.keys().collect::<Vec<_>>(),
            default_checks.keys().collect::<Vec<_>>(),
            "{ctx}: check names"
        );
        if DETERMINISTIC.contains(&case.as_str()) {
            assert_eq!(mr_checks, default_checks, "{ctx}: checks per name");
            for (name, mv, dv) in [
                ("total_requests", mc.total_requests, dc.total_requests),
                ("failed_requests", mc.failed_requests, dc.failed_requests),
                ("iterations_total", mc.iterations_total, dc.iterations_total),
                ("checks_total", mc.checks_total, dc.checks_total),
                ("checks_passed", mc.checks_passed, dc.checks_passed),
                ("checks_failed", mc.checks_failed, dc.checks_failed),
                ("vus_max", mc.vus_max, dc.vus_max),
                ("data_sent_bytes", mc.data_sent_bytes, dc.data_sent_bytes),
            ] {
                assert_eq!(mv, dv, "{ctx}: {name}");
            }
        }

        // The script's own metrics have fixed values in these cases: the same stats.
        if DETERMINISTIC.contains(&case.as_str()) {
            let mut compared = 0;
            for m in mr
                .metrics
                .iter()
                .filter(|m| m.metric_name.starts_with("my_"))
            {
                if m.contains == Some("time") {
                    continue;
                }
                let d = default
                    .metrics
                    .iter()
                    .find(|d| d.metric_name == m.metric_name)
                    .unwrap();
                let stats = |r: &k6_ingest::summary::extract::MetricRow| {
                    let rate = (r.metric_type == Some("rate")).then_some(r.rate);
                    (
                        r.value,
                        rate,
                        r.passes,
                        r.fails,
                        (r.min_value, r.max_value, r.avg_value, r.med_value),
                        (r.p90_value, r.p95_value),
                    )
                };
                assert_eq!(stats(m), stats(d), "{ctx}: {}", m.metric_name);
                compared += 1;
            }
            assert!(compared > 0 || case == "groups-nested-checks", "{ctx}");
        }

        // Values: each column equals the machine-readable file's own number.
        let doc = json(&mr_dir.join("summary.json"));
        let stat = |metric: &str, key: &str| -> Option<f64> {
            mr_values(&doc, metric).and_then(|v| v[key].as_f64())
        };
        let rounded = |v: Option<f64>, factor: f64| v.map(|v| (v * factor).round() as i64);
        let seconds = doc["config"]["duration"].as_f64().unwrap();
        assert_eq!(mc.duration_ms, rounded(Some(seconds), 1000.0), "{ctx}");
        let d = "http_req_duration";
        for (column, key, got) in [
            ("avg", "avg", mc.avg_response_time_ms),
            ("p50", "med", mc.p50_response_time_ms),
            ("p90", "p90", mc.p90_response_time_ms),
            ("p95", "p95", mc.p95_response_time_ms),
            ("min", "min", mc.min_response_time_ms),
            ("max", "max", mc.max_response_time_ms),
        ] {
            assert!(stat(d, key).is_some(), "{ctx}: {d} {key} in the file");
            assert_eq!(got, rounded(stat(d, key), 1.0), "{ctx}: {column}");
        }
        // p99 is not in this format: from the run's raw samples, between p95 and max.
        let p99 = mc.p99_response_time_ms.unwrap();
        assert!(
            (mc.p95_response_time_ms.unwrap()..=mc.max_response_time_ms.unwrap()).contains(&p99),
            "{ctx}: p99 {p99}"
        );
        assert_eq!(
            mc.value_sources
                .get("p99_response_time_ms")
                .map(ValueSource::as_str),
            Some("samples"),
            "{ctx}"
        );
        let duration_row = mr.metrics.iter().find(|m| m.metric_name == d).unwrap();
        assert_eq!(
            (duration_row.p90_value, duration_row.p95_value),
            (
                rounded(stat(d, "p90"), 1000.0),
                rounded(stat(d, "p95"), 1000.0)
            ),
            "{ctx}: p90/p95 of the metric row, in µs"
        );
        assert_eq!(mc.total_requests, rounded(stat("http_reqs", "count"), 1.0));
        assert_eq!(
            mc.failed_requests,
            rounded(stat("http_req_failed", "matches"), 1.0),
            "{ctx}: failed requests are http_req_failed's matches"
        );
        // Counters have no rate in this format: derived from count and the duration.
        let count = stat("http_reqs", "count").unwrap();
        assert_eq!(
            mc.request_rate,
            rounded(Some(count / seconds), 100.0),
            "{ctx}"
        );
        assert_eq!(
            mc.value_sources
                .get("request_rate")
                .map(ValueSource::as_str),
            Some("derived"),
            "{ctx}"
        );
        let iterations = stat("iterations", "count").unwrap();
        assert_eq!(mc.iterations_total, rounded(Some(iterations), 1.0));
        assert_eq!(
            mc.iterations_rate,
            rounded(Some(iterations / seconds), 100.0),
            "{ctx}"
        );
        assert_eq!(
            mr.metrics
                .iter()
                .find(|m| m.metric_name == "http_reqs")
                .unwrap()
                .sources
                .get("rate")
                .map(ValueSource::as_str),
            Some("derived"),
            "{ctx}"
        );
        assert_eq!(mc.vus_max, rounded(stat("vus_max", "value"), 1.0), "{ctx}");
        match stat("checks_total", "count") {
            Some(total) => {
                assert_eq!(mc.checks_total, rounded(Some(total), 1.0), "{ctx}");
                assert_eq!(
                    mc.checks_passed,
                    rounded(stat("checks_succeeded", "matches"), 1.0),
                    "{ctx}"
                );
                assert_eq!(
                    mc.checks_failed,
                    rounded(stat("checks_failed", "matches"), 1.0),
                    "{ctx}"
                );
            }
            None => assert_eq!(mc.checks_total, None, "{ctx}"),
        }
    }
}

/// k6 2.2.0 writes the same default formats as 1.1.0: the same case extracts to the same
/// structure and the same deterministic values.
#[test]
fn k6_2_2_0_default_fixtures_extract_like_1_1_0() {
    let cases: Vec<String> = all_fixture_runs()
        .into_iter()
        .filter(|(v, _)| v == "v1.1.0")
        .map(|(_, c)| c)
        .collect();
    assert!(cases.len() >= 20, "{cases:?}");
    for case in &cases {
        let ctx = format!("v2.2.0/{case}");
        let dir = fixture_dir("v2.2.0", case);
        assert!(dir.join("message.json").is_file(), "{ctx} missing");
        let (new, old) = (
            extract_fixture(&dir),
            extract_fixture(&fixture_dir("v1.1.0", case)),
        );
        let (nc, oc) = (&new.columns, &old.columns);
        assert_eq!(nc.summary_format, oc.summary_format, "{ctx}");
        assert_eq!(nc.status, oc.status, "{ctx}");
        assert_eq!(nc.exit_code, oc.exit_code, "{ctx}");
        assert_eq!(present(&new), present(&old), "{ctx}: columns with a value");
        assert_eq!(nc.value_sources, oc.value_sources, "{ctx}");
        assert_eq!(
            threshold_set(&new),
            threshold_set(&old),
            "{ctx}: thresholds"
        );
        let metrics = |e: &Extraction| {
            e.metrics
                .iter()
                .map(|m| (m.metric_name.clone(), m.metric_type, m.contains))
                .collect::<BTreeSet<_>>()
        };
        assert_eq!(metrics(&new), metrics(&old), "{ctx}: metrics");
        let checks = |e: &Extraction, counts: bool| {
            e.checks
                .iter()
                .map(|c| {
                    let n = counts.then_some((c.passes, c.fails));
                    (c.group_path.clone(), c.path.clone(), c.name.clone(), n)
                })
                .collect::<Vec<_>>()
        };
        let fixed = DETERMINISTIC.contains(&case.as_str())
            || ["no-http", "extreme-values", "json-logs"].contains(&case.as_str());
        assert_eq!(checks(&new, fixed), checks(&old, fixed), "{ctx}: checks");
        if fixed {
            for (name, a, b) in [
                ("total_requests", nc.total_requests, oc.total_requests),
                ("iterations_total", nc.iterations_total, oc.iterations_total),
                ("checks_total", nc.checks_total, oc.checks_total),
                ("checks_passed", nc.checks_passed, oc.checks_passed),
            ] {
                assert_eq!(a, b, "{ctx}: {name}");
            }
        }
    }
}

/// The threshold evaluator gives k6's own verdict for every threshold of every fixture,
/// judged on that run's summary values: summary.json (`ok`) and the legacy export
/// (`true` = failed), every version.
#[test]
fn threshold_evaluator_reproduces_k6s_verdicts() {
    let mut judged = 0;
    let mut failed_judged = 0;
    let mut files = BTreeSet::new();
    let mut problems = Vec::new();
    for (version, case) in all_fixture_runs() {
        let dir = fixture_dir(&version, &case);
        for file in ["summary.json", "summary-export.json"] {
            let Ok(bytes) = std::fs::read(dir.join(file)) else {
                continue;
            };
            let summary = parse_summary(&bytes).unwrap();
            if summary.format == SummaryFormat::MachineReadable {
                assert!(
                    summary.metrics.iter().all(|m| m.thresholds.is_empty()),
                    "{version}/{case}/{file}: the machine-readable format has no thresholds"
                );
                continue;
            }
            for m in &summary.metrics {
                for t in &m.thresholds {
                    let at = format!("{version}/{case}/{file} {} {}", m.name, t.expression);
                    match evaluate_on_metric(&t.expression, m) {
                        Ok(ok) if ok == t.ok => {
                            judged += 1;
                            failed_judged += usize::from(!ok);
                            files.insert(format!("{version}/{case}/{file}"));
                        }
                        Ok(ok) => problems.push(format!("{at}: evaluator {ok}, k6 {}", t.ok)),
                        Err(e) => problems.push(format!("{at}: {e}")),
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // 443 thresholds (77 failed) in 99 files when this was written.
    assert!(judged >= 400, "only {judged} thresholds judged");
    assert!(failed_judged >= 70, "only {failed_judged} failing verdicts");
    assert!(files.len() >= 90, "only {} files", files.len());
}
