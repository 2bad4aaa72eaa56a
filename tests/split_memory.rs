//! A split run's merge stays within the memory budget of one run in flight, whatever the
//! number of parts: the real binary replays 64 parts whose summaries sit just under the
//! caps (`fetch.max_summary_bytes`, `ingest.max_metrics`), built from a real part of the
//! 4-part split fixture, and its kernel peak RSS is compared with the replay of the
//! 4-part fixture itself, measured the same way in the same test. The merged run must be
//! stored with exact sums.
//!
//! Run with `--no-capture` to see the figures.

mod harness;

use k6_ingest::config::Settings;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use harness::*;
use k6_ingest::s3::ArtifactStore;
use serde_json::Value;
use sqlx::PgPool;
use uuid::Uuid;

/// A run in flight may cost at most this much more than the baseline (README "Memory budget").
const RUN_BUDGET_KIB: i64 = 64 * 1024;
const PARTS: u32 = 64;
/// Metrics added to each part's summary: with the fixture's 22, 9,922 (cap 10,000).
const COPIES: usize = 9_900;
/// Each part's summary is padded to about this many bytes (cap 2,097,152).
const TARGET_BYTES: usize = 2_080_000;

fn split_case() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6-split/v1.1.0/split4-merged-pass")
}

/// Replays `dir` with the real binary; returns its exit code and its own peak RSS in KiB.
fn replay(dir: &Path, db_url: &str, s: &Settings) -> (i32, i64) {
    forked_exit_and_peak_rss(&mut replay_command(dir, db_url, s))
}

/// Writes part `index` of `count` of run `run_id` into `dst`: the files of fixture part
/// `src`, its message renumbered, and its summary replaced by `summary` when given.
fn write_part(
    src: &Path,
    dst: &Path,
    run_id: Uuid,
    index: u32,
    count: u32,
    summary: Option<&[u8]>,
) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let path = dst.join("message.json");
    let mut msg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    msg["run_id"] = run_id.to_string().into();
    msg["event_id"] = Uuid::now_v7().to_string().into();
    msg["part"]["index"] = index.into();
    msg["part"]["count"] = count.into();
    msg["part"]["runner"] = format!("runner-{index}").into();
    msg["part"]["execution_segment"] = Value::Null;
    std::fs::write(&path, msg.to_string()).unwrap();
    if let Some(s) = summary {
        std::fs::write(dst.join("summary.json"), s).unwrap();
    }
}

/// The added counters' and rates' values in part `part`: every part differs, so only
/// a sum over all of them gives the merged value.
fn copy_count(part: u32, i: usize) -> u64 {
    (i as u64 % 97) * 3 + u64::from(part) * 7 + 1
}

fn copy_passes(part: u32, i: usize) -> u64 {
    (i as u64 % 13) + u64::from(part)
}

fn copy_fails(part: u32, i: usize) -> u64 {
    (i as u64 + u64::from(part)) % 5
}

/// The fixture part's summary with `COPIES` more metrics spliced into its `metrics`
/// object (alternately a counter and a rate, each under its own tag padded by `pad`).
fn near_cap_summary(fixture: &str, part: u32, pad: usize) -> Vec<u8> {
    let padding = "x".repeat(pad);
    let mut copies = String::with_capacity(TARGET_BYTES);
    for i in 0..COPIES {
        if i % 2 == 0 {
            let c = copy_count(part, i);
            write!(
                copies,
                r#""split_copies{{copy:{padding}{i}}}":{{"type":"counter","contains":"default","values":{{"count":{c},"rate":{}}}}},"#,
                c as f64 / 12.5
            )
            .unwrap();
        } else {
            let (p, f) = (copy_passes(part, i), copy_fails(part, i));
            let rate = if p + f > 0 {
                p as f64 / (p + f) as f64
            } else {
                0.0
            };
            write!(
                copies,
                r#""split_copy_rate{{copy:{padding}{i}}}":{{"type":"rate","contains":"default","values":{{"rate":{rate},"passes":{p},"fails":{f}}}}},"#
            )
            .unwrap();
        }
    }
    let at = fixture.find("\"metrics\": {").expect("a metrics object") + "\"metrics\": {".len();
    let mut doc = String::with_capacity(fixture.len() + copies.len());
    doc.push_str(&fixture[..at]);
    doc.push_str(&copies);
    doc.push_str(&fixture[at..]);
    doc.into_bytes()
}

/// The padding that brings the largest part's summary closest to `TARGET_BYTES` from
/// below (the last part has the widest numbers).
fn padding_for(fixtures: &[String]) -> usize {
    let bare = fixtures
        .iter()
        .map(|f| near_cap_summary(f, PARTS - 1, 0).len())
        .max()
        .unwrap();
    (TARGET_BYTES - bare) / COPIES
}

/// Writes the 64 near-cap parts of a new run under `root`; returns the run id and the
/// padding of the added metrics' tags.
fn write_near_cap_run(root: &Path) -> (Uuid, String) {
    let run = Uuid::now_v7();
    let fixtures: Vec<PathBuf> = (0..4)
        .map(|i| split_case().join(format!("part-{i}")))
        .collect();
    let texts: Vec<String> = fixtures
        .iter()
        .map(|d| std::fs::read_to_string(d.join("summary.json")).unwrap())
        .collect();
    let pad = padding_for(&texts);
    for index in 0..PARTS {
        let src = (index % 4) as usize;
        let doc = near_cap_summary(&texts[src], index, pad);
        assert!(
            doc.len() > 2_000_000 && doc.len() < 2_097_152,
            "part {index}: {} bytes",
            doc.len()
        );
        if index == 0 {
            let v: Value = serde_json::from_slice(&doc).unwrap();
            assert_eq!(v["metrics"].as_object().unwrap().len(), COPIES + 22);
        }
        write_part(
            &fixtures[src],
            &root.join(format!("part-{index:02}")),
            run,
            index,
            PARTS,
            Some(&doc),
        );
    }
    (run, "x".repeat(pad))
}

fn fixture_sum(metric: &str, stat: &str) -> f64 {
    (0..PARTS)
        .map(|index| {
            let dir = split_case().join(format!("part-{}", index % 4));
            let v: Value =
                serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
            v["metrics"][metric]["values"][stat].as_f64().unwrap()
        })
        .sum()
}

#[derive(Debug)]
struct MergedRow {
    status: String,
    merged_parts: Option<String>,
    total_requests: Option<i64>,
    summary_json: Option<Value>,
    summary_s3_url: Option<String>,
    metric_rows: i64,
}

async fn merged_row(pool: &PgPool, run: Uuid) -> MergedRow {
    let (status, merged_parts, total_requests, summary_json, summary_s3_url) =
        sqlx::query_as::<_, (String, Option<String>, Option<i64>, Option<Value>, Option<String>)>(
            "SELECT status, value_sources ->> 'merged_parts', total_requests, summary_json, summary_s3_url \
             FROM k6_performance_runs WHERE run_id = $1",
        )
        .bind(run)
        .fetch_one(pool)
        .await
        .unwrap();
    let metric_rows = sqlx::query_scalar(
        "SELECT count(*) FROM k6_metrics_history h JOIN k6_performance_runs p ON p.id = h.k6_run_id \
         WHERE p.run_id = $1",
    )
    .bind(run)
    .fetch_one(pool)
    .await
    .unwrap();
    MergedRow {
        status,
        merged_parts,
        total_requests,
        summary_json,
        summary_s3_url,
        metric_rows,
    }
}

/// `(value, passes, fails)` of one metric's history row (a counter's value is its
/// count × 1000).
async fn history(
    pool: &PgPool,
    run: Uuid,
    metric: &str,
) -> (Option<i64>, Option<i64>, Option<i64>) {
    sqlx::query_as(
        "SELECT h.value, h.passes, h.fails FROM k6_metrics_history h JOIN k6_performance_runs p ON p.id = h.k6_run_id \
         WHERE p.run_id = $1 AND h.metric_name = $2",
    )
    .bind(run)
    .bind(metric)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{metric}: {e}"))
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn merging_64_near_cap_parts_stays_within_the_memory_budget(pool: PgPool) {
    let s = settings();
    let store = store(&s).await;
    let db_url = database_url(&pool);

    let baseline = baseline_peak(&pool, &s, &db_url).await;
    eprintln!("peak RSS baseline (4-part fixture, merged): {baseline} KiB");

    let tmp = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    let (run, pad) = write_near_cap_run(tmp.path());
    eprintln!("64 near-cap parts written in {:?}", started.elapsed());
    let started = std::time::Instant::now();
    let (code, peak) = replay(tmp.path(), &db_url, &s);
    eprintln!("64 near-cap parts replayed in {:?}", started.elapsed());
    eprintln!(
        "peak RSS 64 near-cap parts ({COPIES} + 22 metrics, ~{TARGET_BYTES} bytes each), merged: \
         {peak} KiB ({:+} KiB vs baseline)",
        peak - baseline
    );
    assert_eq!(code, 0);
    assert_merged_exactly(&pool, &store, run, &pad).await;

    assert!(
        peak - baseline <= RUN_BUDGET_KIB,
        "peak RSS {peak} KiB, baseline {baseline} KiB: more than 64 MiB above"
    );
}

/// Replays the 4-part fixture as k6 wrote it, under a run id of its own; returns the
/// peak RSS. Its merged summary is small: inlined in `summary_json`.
async fn baseline_peak(pool: &PgPool, s: &Settings, db_url: &str) -> i64 {
    let tmp = tempfile::tempdir().unwrap();
    let run = Uuid::now_v7();
    for i in 0..4 {
        let src = split_case().join(format!("part-{i}"));
        write_part(&src, &tmp.path().join(format!("part-{i}")), run, i, 4, None);
    }
    let (code, peak) = replay(tmp.path(), db_url, s);
    assert_eq!(code, 0);
    let row = merged_row(pool, run).await;
    assert_eq!(row.merged_parts.as_deref(), Some("4 of 4"));
    assert_ne!(row.status, "error");
    assert_eq!(row.summary_s3_url, None);
    let doc = row.summary_json.expect("a small merged summary is inlined");
    assert_eq!(doc["merged_from_parts"], "4 of 4");
    let requests = doc["summary"]["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "http_reqs")
        .and_then(|m| m["values"]["count"].as_f64());
    assert_eq!(requests, Some(fixture_sum("http_reqs", "count") / 16.0));
    peak
}

/// The merged run of the 64 near-cap parts is stored with exact sums, in its rows and
/// in its summary document (in S3: far above `s3.inline_summary_max_bytes`).
async fn assert_merged_exactly(pool: &PgPool, store: &ArtifactStore, run: Uuid, pad: &str) {
    let row = merged_row(pool, run).await;
    assert_ne!(row.status, "error", "{:?}", row.merged_parts);
    assert_eq!(row.merged_parts.as_deref(), Some("64 of 64"));
    assert_eq!(row.metric_rows, (COPIES + 22) as i64);
    assert_eq!(
        row.total_requests,
        Some(fixture_sum("http_reqs", "count") as i64)
    );
    assert_eq!(row.summary_json, None, "too large to inline");
    let url = row.summary_s3_url.as_deref().expect("stored in S3");
    let key = url
        .strip_prefix(&format!("s3://{}/", store.bucket()))
        .unwrap_or_else(|| panic!("{url} is not in the run's bucket"));
    assert!(
        key.ends_with(&format!("{run}/merged-summary.json")),
        "{key}"
    );
    let doc: Value = serde_json::from_slice(&get_object(store, key).await).unwrap();
    assert_eq!(doc["merged_from_parts"], "64 of 64");
    let metrics = doc["summary"]["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), COPIES + 22);
    let in_doc = |name: &str, stat: &str| {
        metrics
            .iter()
            .find(|m| m["name"] == name)
            .and_then(|m| m["values"][stat].as_f64())
    };
    for i in [0, 4_242, COPIES - 2] {
        let want: u64 = (0..PARTS).map(|p| copy_count(p, i)).sum();
        let name = format!("split_copies{{copy:{pad}{i}}}");
        let (value, _, _) = history(pool, run, &name).await;
        assert_eq!(value, Some(want as i64 * 1000), "{name}");
        assert_eq!(in_doc(&name, "count"), Some(want as f64), "{name}");
    }
    for i in [1, 5_001, COPIES - 1] {
        let passes: u64 = (0..PARTS).map(|p| copy_passes(p, i)).sum();
        let fails: u64 = (0..PARTS).map(|p| copy_fails(p, i)).sum();
        let name = format!("split_copy_rate{{copy:{pad}{i}}}");
        let got = history(pool, run, &name).await;
        let want = (None, Some(passes as i64), Some(fails as i64));
        assert_eq!(got, want, "{name}");
        let rate = passes as f64 / (passes + fails) as f64;
        assert_eq!(in_doc(&name, "rate"), Some(rate), "{name}");
    }
}
