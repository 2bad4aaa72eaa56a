//! The binary as a user runs it: `extract` with no services, configuration errors that
//! name the setting, and `replay`'s table and exit code.

mod harness;

use std::process::Output;

use harness::*;
use serde_json::{Value, json};

/// The binary with no services: nothing from the developer's environment leaks in.
fn k6_ingest(args: &[&str], env: &[(&str, &str)]) -> Output {
    bare_command(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn extract_prints_the_columns_as_one_json_object() {
    let file = fixture_dir("v1.1.0", "thresholds-fail").join("summary.json");
    let out = k6_ingest(
        &["extract", file.to_str().unwrap(), "--exit-code", "99"],
        &[],
    );
    assert_success(&out);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "failed");
    assert_eq!(v["total_requests"], 66);
    assert_eq!(v["thresholds_failed"], 2);
    assert_eq!(v["exit_code"], 99);
    // Each column holds the value the summary gives (SPEC: milliseconds rounded, rates
    // per second x 100 rounded); p(99) is NULL: this summary has none and `extract`
    // reads no samples.
    let summary = read_json(&file);
    let m = &summary["metrics"];
    let expected = [
        (
            "p95_response_time_ms",
            json!(
                m["http_req_duration"]["values"]["p(95)"]
                    .as_f64()
                    .unwrap()
                    .round() as i64
            ),
        ),
        ("p99_response_time_ms", Value::Null),
        (
            "request_rate",
            json!((m["http_reqs"]["values"]["rate"].as_f64().unwrap() * 100.0).round() as i64),
        ),
        (
            "checks_total",
            json!(
                m["checks"]["values"]["passes"].as_i64().unwrap()
                    + m["checks"]["values"]["fails"].as_i64().unwrap()
            ),
        ),
        ("vus_max", m["vus_max"]["values"]["max"].clone()),
        ("data_sent_bytes", m["data_sent"]["values"]["count"].clone()),
    ];
    for (column, value) in expected {
        assert_eq!(v.get(column), Some(&value), "column {column}");
    }
    assert!(m["http_req_duration"]["values"].get("p(99)").is_none());
    // --exit-code 99 with passing thresholds is still `failed`; the exit code matters.
    let pass = fixture_dir("v1.1.0", "thresholds-pass").join("summary.json");
    let out = k6_ingest(
        &["extract", pass.to_str().unwrap(), "--exit-code", "105"],
        &[],
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["status"], "cancelled");
}

#[test]
fn extract_reports_bad_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("summary.json");
    std::fs::write(&bad, b"{\"hello\": 1}").unwrap();
    let out = k6_ingest(&["extract", bad.to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a k6 summary"), "{err}");
    let out = k6_ingest(&["extract", "/no/such/file.json"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
}

#[test]
fn bad_settings_fail_at_start_naming_the_setting() {
    let file = fixture_dir("v1.1.0", "thresholds-fail").join("summary.json");
    let f = file.to_str().unwrap();
    let cases = [
        (
            "K6_INGEST__S3__PART_SIZE_BYTES",
            "1024",
            "s3.part_size_bytes",
        ),
        ("K6_INGEST__AMQP__PREFETCH", "lots", "prefetch"),
        ("K6_INGEST__S3__ENDPOINT", "not a url", "s3.endpoint"),
        ("K6_INGEST__HTTP__BIND", "localhost", "http.bind"),
        ("K6_INGEST__S3__CHECKSUM", "sometimes", "checksum"),
        (
            "K6_INGEST__RETENTION__HOT_MONTHS",
            "0",
            "retention.hot_months",
        ),
    ];
    for (var, value, named) in cases {
        let out = k6_ingest(&["extract", f], &[(var, value)]);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(named), "{var}={value}: {err}");
    }
    let out = k6_ingest(&["replay", fixtures().to_str().unwrap()], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("K6_INGEST__DATABASE__URL"), "{err}");
}

#[test]
fn a_secret_never_appears_in_errors() {
    let out = k6_ingest(
        &["migrate"],
        &[
            (
                "K6_INGEST__DATABASE__URL",
                "postgres://user:hunter2-secret@127.0.0.1:1/db",
            ),
            ("K6_INGEST__DATABASE__ACQUIRE_TIMEOUT_SECS", "1"),
        ],
    );
    assert!(!out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("hunter2-secret"), "{all}");
}

#[test]
fn dry_run_replay_needs_no_services_and_prints_the_table() {
    let out = k6_ingest(
        &[
            "replay",
            "--dry-run",
            fixture_dir("v1.1.0", "trend-stats").to_str().unwrap(),
        ],
        &[],
    );
    assert_success(&out);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("RESULT"), "{table}");
    assert!(
        table.contains("dry run") && table.contains("passed"),
        "{table}"
    );
    assert!(table.contains("1 runs: 0 ingested"), "{table}");
}

#[test]
fn replay_exits_non_zero_when_a_run_fails() {
    let unreadable_summary = copy_fixture("v1.1.0", "thresholds-pass");
    std::fs::write(unreadable_summary.path().join("summary.json"), b"not json").unwrap();
    let unknown_version = tempfile::tempdir().unwrap();
    std::fs::write(
        unknown_version.path().join("message.json"),
        b"{\"schema_version\": 7}",
    )
    .unwrap();
    for (dir, why) in [
        (unreadable_summary.path(), "not valid JSON"),
        (unknown_version.path(), "unknown schema_version 7"),
    ] {
        let out = k6_ingest(&["replay", "--dry-run", dir.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(1));
        let table = String::from_utf8_lossy(&out.stdout);
        assert!(table.contains("FAILED") && table.contains(why), "{table}");
    }
}
