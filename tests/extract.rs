//! Extraction over every real fixture: snapshots, agreement between the two summary files
//! of one run, agreement with the numbers k6 itself printed, exact percentiles from raw
//! samples, and robustness against arbitrary input. No services needed.

mod harness;

use std::collections::BTreeSet;

use harness::*;
use k6_ingest::artifact::open_lines;
use k6_ingest::summary::samples::collect_samples;
use k6_ingest::summary::{Extraction, ValueSource, extract, parse_summary, wanted_samples};
use proptest::prelude::*;

#[test]
fn every_fixture_matches_its_snapshot() {
    let runs = all_fixture_runs();
    assert!(runs.len() >= 30, "fixtures missing: {runs:?}");
    for (version, case) in runs {
        let extraction = extract_fixture(&fixture_dir(&version, &case));
        insta::with_settings!({ snapshot_suffix => format!("{version}-{case}"), prepend_module_to_snapshot => false }, {
            insta::assert_json_snapshot!("extract", extraction);
        });
    }
}

#[test]
fn statuses_follow_thresholds_and_exit_codes() {
    let expect = [
        ("thresholds-pass", "passed"),
        ("thresholds-fail", "failed"),
        ("abort-on-fail", "failed"),
        ("interrupted", "failed"), // 105, but a threshold failed
        ("script-error", "error"),
        ("no-http", "passed"),
        ("all-fail", "failed"),
        ("legacy-export", "failed"),
    ];
    for version in ["v2.2.0", "v1.1.0", "v0.57.0"] {
        for (case, status) in expect {
            let e = extract_fixture(&fixture_dir(version, case));
            assert_eq!(e.columns.status.as_str(), status, "{version}/{case}");
        }
    }
    for version in ["v2.2.0", "v1.1.0"] {
        let e = extract_fixture(&fixture_dir(version, "test-fail"));
        assert_eq!(
            e.columns.status.as_str(),
            "failed",
            "{version}: exec.test.fail() exits 110"
        );
    }
}

#[test]
fn failed_requests_come_from_http_req_failed_passes() {
    let e = extract_fixture(&fixture_dir("v1.1.0", "all-fail"));
    let c = &e.columns;
    assert_eq!(c.failed_requests, c.total_requests, "every request failed");
    assert!(c.total_requests.unwrap() > 0);
    let no_http = extract_fixture(&fixture_dir("v1.1.0", "no-http"));
    assert_eq!(
        no_http.columns.total_requests, None,
        "k6 reported no requests: NULL, not 0"
    );
    assert_eq!(no_http.columns.p95_response_time_ms, None);
}

/// The legacy `--summary-export` file is a lossy transform of the same data: both files
/// of one run must give the same columns and detail rows where both carry them.
#[test]
fn summary_json_and_export_of_one_run_agree() {
    let mut compared = 0;
    for (version, case) in all_fixture_runs() {
        let dir = fixture_dir(&version, &case);
        let (Ok(a), Ok(b)) = (
            std::fs::read(dir.join("summary.json")),
            std::fs::read(dir.join("summary-export.json")),
        ) else {
            continue;
        };
        let exit = message(&dir).exit_code;
        let (a, b) = (parse_summary(&a).unwrap(), parse_summary(&b).unwrap());
        let (ea, eb) = (extract(&a, exit, None), extract(&b, exit, None));
        let mut ca = serde_json::to_value(&ea.columns).unwrap();
        let mut cb = serde_json::to_value(&eb.columns).unwrap();
        for c in [&mut ca, &mut cb] {
            for k in ["duration_ms", "summary_format", "warnings", "value_sources"] {
                c.as_object_mut().unwrap().remove(k);
            }
        }
        assert_eq!(ca, cb, "{version}/{case}");
        assert_eq!(
            threshold_set(&ea),
            threshold_set(&eb),
            "{version}/{case} thresholds"
        );
        let ck = |e: &Extraction| {
            e.checks
                .iter()
                .map(|c| (c.group_path.clone(), c.name.clone(), c.passes, c.fails))
                .collect::<BTreeSet<_>>()
        };
        assert_eq!(ck(&ea), ck(&eb), "{version}/{case} checks");
        compared += 1;
    }
    assert!(compared >= 25, "only {compared} runs had both files");
}

/// A duration as k6 prints it (`124.22µs`, `50.9ms`, `1.2s`, `0s`), in milliseconds.
fn printed_ms(text: &str) -> f64 {
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap();
    let (num, unit) = text.split_at(split);
    let n: f64 = num.parse().unwrap();
    match unit {
        "ns" => n / 1e6,
        "µs" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        other => panic!("unit {other:?} in {text:?}"),
    }
}

/// The tolerance of a printed duration: k6 prints two decimals in the unit it picked,
/// cut rather than rounded (`51.289136` ms prints as `51.28ms`), so one unit in the last
/// place.
fn printed_tolerance_ms(text: &str) -> f64 {
    if text.ends_with("µs") {
        0.01e-3
    } else if text.ends_with("ns") {
        0.01e-6
    } else if text.ends_with("ms") {
        0.01
    } else {
        10.0
    }
}

fn line_after<'a>(stdout: &'a str, label: &str) -> &'a str {
    stdout
        .lines()
        .map(str::trim_start)
        .map(|l| l.trim_start_matches(['✓', '✗', ' ']))
        .find(|l| l.starts_with(label) && l[label.len()..].starts_with('.'))
        .unwrap_or_else(|| panic!("no {label} line in:\n{stdout}"))
        .split_once(':')
        .unwrap()
        .1
}

/// Checks extracted values against the end-of-test summary k6 printed for the same run.
#[test]
fn extracted_values_match_what_k6_printed() {
    let cases = [
        ("v2.2.0", "thresholds-fail-printed"),
        ("v2.2.0", "thresholds-pass-printed"),
        ("v2.2.0", "legacy-export"),
        ("v2.2.0", "legacy-export-full"),
        ("v1.1.0", "thresholds-fail-printed"),
        ("v1.1.0", "thresholds-pass-printed"),
        ("v1.1.0", "legacy-export"),
        ("v1.1.0", "legacy-export-full"),
        ("v0.57.0", "thresholds-fail-printed"),
        ("v0.57.0", "thresholds-pass-printed"),
        ("v0.57.0", "legacy-export"),
    ];
    for (version, case) in cases {
        let dir = fixture_dir(version, case);
        let stdout = std::fs::read_to_string(dir.join("stdout.txt")).unwrap();
        let export =
            parse_summary(&std::fs::read(dir.join("summary-export.json")).unwrap()).unwrap();
        let e = extract(&export, message(&dir).exit_code, None);
        let c = &e.columns;
        let raw = |metric: &str, stat: &str| export.metric(metric).unwrap().value(stat).unwrap();
        let ctx = format!("{version}/{case}");

        // http_req_duration: avg=… min=… med=… max=… p(90)=… p(95)=…
        let line = line_after(&stdout, "http_req_duration");
        for part in line.split_whitespace() {
            let (stat, shown) = part.split_once('=').unwrap();
            let (k6_ms, tol) = (printed_ms(shown), printed_tolerance_ms(shown));
            assert!(
                (raw("http_req_duration", stat) - k6_ms).abs() <= tol + 1e-9,
                "{ctx} {stat}: {shown}"
            );
            let stored = match stat {
                "avg" => c.avg_response_time_ms,
                "min" => c.min_response_time_ms,
                "med" => c.p50_response_time_ms,
                "max" => c.max_response_time_ms,
                "p(90)" => c.p90_response_time_ms,
                "p(95)" => c.p95_response_time_ms,
                other => panic!("{ctx}: unexpected stat {other}"),
            }
            .unwrap() as f64;
            assert!(
                (stored - k6_ms).abs() <= 0.5 + tol + 1e-9,
                "{ctx} stored {stat} {stored} ms vs printed {shown}"
            );
        }

        // http_reqs: <count> <rate>/s
        let mut it = line_after(&stdout, "http_reqs").split_whitespace();
        let count: i64 = it.next().unwrap().parse().unwrap();
        let rate: f64 = it.next().unwrap().trim_end_matches("/s").parse().unwrap();
        assert_eq!(c.total_requests, Some(count), "{ctx}");
        assert!(
            (c.request_rate.unwrap() as f64 / 100.0 - rate).abs() <= 0.005 + 1e-6,
            "{ctx} rate {rate}"
        );
        assert!(
            (raw("http_reqs", "rate") - rate).abs() <= 1e-6,
            "{ctx} rate {rate}"
        );

        // iterations: <count> <rate>/s
        let mut it = line_after(&stdout, "iterations").split_whitespace();
        assert_eq!(
            c.iterations_total,
            Some(it.next().unwrap().parse().unwrap()),
            "{ctx}"
        );

        // http_req_failed: <pct>% <n> out of <total>
        let parts: Vec<&str> = line_after(&stdout, "http_req_failed")
            .split_whitespace()
            .collect();
        assert_eq!(
            c.failed_requests,
            Some(parts[1].parse().unwrap()),
            "{ctx} failed requests"
        );

        // checks: `checks_succeeded: 73.68% 28 out of 38` (1.x, 2.x) or `checks: 73.68% 28 out of 38` (0.57).
        let label = if version != "v0.57.0" {
            "checks_succeeded"
        } else {
            "checks"
        };
        let parts: Vec<&str> = line_after(&stdout, label).split_whitespace().collect();
        assert_eq!(
            c.checks_passed,
            Some(parts[1].parse().unwrap()),
            "{ctx} checks"
        );
        assert_eq!(
            c.checks_total,
            Some(parts[4].parse().unwrap()),
            "{ctx} checks total"
        );

        // 1.x and 2.x print each threshold with the value it was judged on: ✗ 'p(95)<5' p(95)=50.9ms
        if version != "v0.57.0" {
            for line in stdout.lines().map(str::trim) {
                let Some(rest) = line
                    .strip_prefix("✗ '")
                    .or_else(|| line.strip_prefix("✓ '"))
                else {
                    continue;
                };
                let (expr, shown) = rest.split_once("' ").unwrap();
                let ok = line.starts_with('✓');
                let t = e
                    .thresholds
                    .iter()
                    .find(|t| t.expression == expr)
                    .unwrap_or_else(|| panic!("{ctx}: {expr}"));
                assert_eq!(t.ok, ok, "{ctx} {expr}");
                let (_, value) = shown.split_once('=').unwrap();
                if value.ends_with("ms") || value.ends_with("µs") {
                    assert!(
                        (t.observed_raw.unwrap() - printed_ms(value)).abs()
                            <= printed_tolerance_ms(value) + 1e-9,
                        "{ctx} {expr}"
                    );
                }
            }
        }
    }
}

/// Percentiles computed from raw samples equal the ones k6 computed itself, bit for bit
/// within float tolerance: drop p(99) from a summary that has it and recompute it.
#[test]
fn percentiles_from_samples_equal_k6s_own() {
    for version in ["v2.2.0", "v1.1.0", "v0.57.0"] {
        let dir = fixture_dir(version, "trend-stats");
        let full = parse_summary(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
        let mut reduced = full.clone();
        let mut dropped = 0;
        for m in &mut reduced.metrics {
            if m.name.starts_with("http_req_duration") {
                dropped += usize::from(m.values.remove("p(99)").is_some());
                m.values.remove("p(90)");
            }
        }
        assert!(dropped > 0);
        let samples = collect_samples(
            open_lines(&dir.join("metrics.ndjson.gz")).unwrap(),
            &wanted_samples(&reduced),
            10_000_000,
        )
        .unwrap();
        let e = extract(&reduced, Some(0), Some(&samples));
        let want = full.metric("http_req_duration").unwrap();
        assert_eq!(
            e.columns.p99_response_time_ms,
            Some(want.value("p(99)").unwrap().round() as i64),
            "{version}"
        );
        assert_eq!(
            e.columns.p90_response_time_ms,
            Some(want.value("p(90)").unwrap().round() as i64),
            "{version}"
        );
        assert_eq!(
            e.columns
                .value_sources
                .get("p99_response_time_ms")
                .map(ValueSource::as_str),
            Some("samples")
        );
        let row = e
            .metrics
            .iter()
            .find(|m| m.metric_name == "http_req_duration")
            .unwrap();
        assert_eq!(
            row.p99_value,
            Some((want.value("p(99)").unwrap() * 1000.0).round() as i64),
            "{version} µs"
        );
    }
}

#[test]
fn samples_that_disagree_with_the_summary_are_not_used() {
    let dir = fixture_dir("v1.1.0", "thresholds-fail");
    let summary = parse_summary(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    // Samples of another run: p(95) and max disagree, so p(99) stays NULL.
    let other = fixture_dir("v1.1.0", "thresholds-pass").join("metrics.ndjson.gz");
    let samples = collect_samples(
        open_lines(&other).unwrap(),
        &wanted_samples(&summary),
        10_000_000,
    )
    .unwrap();
    let e = extract(&summary, Some(99), Some(&samples));
    assert_eq!(e.columns.p99_response_time_ms, None);
    assert!(
        e.columns
            .warnings
            .iter()
            .any(|w| w.contains("raw samples not used")),
        "{:?}",
        e.columns.warnings
    );
}

#[test]
fn extreme_values_become_null_with_a_warning_never_a_wrapped_number() {
    for version in ["v2.2.0", "v1.1.0", "v0.57.0"] {
        let e = extract_fixture(&fixture_dir(version, "extreme-values"));
        let m = |name: &str| e.metrics.iter().find(|m| m.metric_name == name).unwrap();
        assert_eq!(m("x_big_counter").value, None, "2e20 × 1000 does not fit");
        assert_eq!(m("x_huge_trend").avg_value, None, "k6 wrote null");
        assert_eq!(m("x_huge_trend").max_value, None);
        assert_eq!(m("x_inf_gauge").value, None);
        let neg = e
            .metrics
            .iter()
            .find(|m| m.metric_name.contains("negative") && m.metric_type == Some("counter"));
        if let Some(neg) = neg {
            assert!(neg.value.unwrap() < 0, "negative counter totals are kept");
        }
        assert!(
            e.columns
                .warnings
                .iter()
                .any(|w| w.contains("x_big_counter")),
            "{version}"
        );
    }
}

#[test]
fn submetric_keys_parse_into_tags() {
    let e = extract_fixture(&fixture_dir("v1.1.0", "submetric-thresholds"));
    let group = e
        .metrics
        .iter()
        .find(|m| m.metric_name == "http_req_duration{group:::g1}")
        .unwrap();
    assert_eq!(group.base_name, "http_req_duration");
    assert_eq!(group.tags.get("group").map(String::as_str), Some("::g1"));
    let quoted = e
        .metrics
        .iter()
        .find(|m| m.metric_name.starts_with("http_req_waiting{"))
        .unwrap();
    assert_eq!(
        quoted.tags.get("name").map(String::as_str),
        Some("with space")
    );
    // A threshold on a submetric with no samples still counts, judged on 0.
    let never = e
        .thresholds
        .iter()
        .find(|t| t.metric_name == "http_reqs{status:418}")
        .unwrap();
    assert_eq!(never.observed_raw, Some(0.0));
}

#[test]
fn machine_readable_summaries_are_read() {
    // k6 1.5's opt-in machine-readable summary (schema 1.0.0); k6 1.1 cannot write it,
    // so this document follows k6's published schema by hand.
    let doc = br#"{"version":"1.0.0","config":{"duration":2.5,"execution":"local","script":"s.js"},
      "metadata":{"generatedAt":"2026-11-22T00:00:00Z","k6Version":"1.5.0"},
      "results":{"checks":{"metrics":[],"results":[{"name":"ok","passes":9,"fails":1}]},
        "metrics":[
          {"name":"http_reqs","type":"counter","contains":"default","values":{"count":50}},
          {"name":"http_req_failed","type":"rate","contains":"default","values":{"rate":0.1,"matches":5,"total":50}},
          {"name":"http_req_duration","type":"trend","contains":"time","values":{"avg":10,"min":1,"med":9,"max":40,"p(90)":20,"p(95)":30.5}}]}}"#;
    let s = parse_summary(doc).unwrap();
    let e = extract(&s, Some(0), None);
    let c = &e.columns;
    assert_eq!(c.summary_format, Some("machine_readable_v1"));
    assert_eq!(c.total_requests, Some(50));
    assert_eq!(c.failed_requests, Some(5));
    assert_eq!(c.request_rate, Some(2000), "50 requests in 2.5 s");
    assert_eq!(c.p95_response_time_ms, Some(31));
    assert_eq!((c.checks_passed, c.checks_total), (Some(9), Some(10)));
    assert_eq!(
        c.thresholds_total, None,
        "this format carries no thresholds"
    );
    assert_eq!(c.duration_ms, Some(2500));
}

fn arb_number() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        Just(serde_json::Value::Null),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        Just(serde_json::json!(1.7e308)),
        Just(serde_json::json!(-1e-9)),
        Just(serde_json::Value::String("x".into())),
    ]
}

fn arb_summary() -> impl Strategy<Value = serde_json::Value> {
    let stat = prop_oneof![
        Just("count"),
        Just("rate"),
        Just("value"),
        Just("min"),
        Just("max"),
        Just("avg"),
        Just("med"),
        Just("p(95)"),
        Just("p(99.9)"),
        Just("passes"),
        Just("fails"),
        Just("p(x)")
    ];
    let metric = (
        prop_oneof![
            Just("counter"),
            Just("gauge"),
            Just("rate"),
            Just("trend"),
            Just("bogus")
        ],
        prop_oneof![Just("default"), Just("time"), Just("data"), Just("??")],
        prop::collection::btree_map(stat, arb_number(), 0..8),
        prop::collection::btree_map("[a-z<>=().0-9 ]{0,12}", any::<bool>(), 0..3),
    );
    let name = prop_oneof![
        Just("http_reqs".to_string()),
        Just("http_req_duration".to_string()),
        Just("http_req_failed".to_string()),
        Just("checks".to_string()),
        "[a-z_]{1,8}(\\{[a-z:, \"]{0,10}\\}?)?",
    ];
    (prop::collection::btree_map(name, metric, 0..8), any::<bool>(), arb_number()).prop_map(|(metrics, legacy, dur)| {
        let metrics: serde_json::Map<String, serde_json::Value> = metrics
            .into_iter()
            .map(|(n, (t, c, values, th))| {
                let v = if legacy {
                    let mut o: serde_json::Map<String, serde_json::Value> = values.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                    o.insert("thresholds".into(), serde_json::json!(th));
                    serde_json::Value::Object(o)
                } else {
                    let th: serde_json::Map<String, serde_json::Value> =
                        th.into_iter().map(|(k, ok)| (k, serde_json::json!({ "ok": ok }))).collect();
                    serde_json::json!({"type": t, "contains": c, "values": values, "thresholds": th})
                };
                (n, v)
            })
            .collect();
        serde_json::json!({
            "metrics": metrics,
            "state": {"testRunDurationMs": dur},
            "root_group": {"name": "", "path": "", "groups": [{"name": "g", "path": "::g", "checks": [{"name": "", "path": "::g::", "passes": 1, "fails": null}]}], "checks": {}}
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_summary(&bytes);
    }

    #[test]
    fn arbitrary_summaries_never_panic(doc in arb_summary(), exit in proptest::option::of(any::<i32>())) {
        if let Ok(s) = parse_summary(doc.to_string().as_bytes()) {
            let e = extract(&s, exit, None);
            // Whatever went in, every stored count is non-negative.
            for v in [e.columns.total_requests, e.columns.failed_requests, e.columns.checks_total, e.columns.iterations_total].into_iter().flatten() {
                prop_assert!(v >= 0);
            }
        }
    }
}
