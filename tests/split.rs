//! Runs split across runners (SPEC section 12), with the real k6 split fixtures
//! (`fixtures/k6-split/`: k6 1.1.0 and 2.2.0 run as 2 or 4 concurrent parts with
//! `--execution-segment`). Every expected value is computed here from the parts' own
//! files with k6's formulas (sums, exact min/max, percentiles by sorting the union of
//! the raw samples, thresholds compared by hand), never by calling the worker's code.

mod harness;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use harness::*;
use k6_ingest::ingest::Ingestor;
use serde_json::Value;
use sqlx::{PgPool, Row};
use uuid::Uuid;

fn part_dirs(version: &str, case: &str) -> Vec<PathBuf> {
    let dir = split_fixtures().join(version).join(case);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("message.json").is_file())
        .collect();
    out.sort();
    out
}

async fn split_ingestor(pool: &PgPool) -> Ingestor {
    ingestor_with_roots(pool, &settings(), vec![split_fixtures()]).await
}

fn summary_of(dir: &Path) -> Option<Value> {
    let bytes = std::fs::read(dir.join("summary.json")).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// The raw sample values of `metric` (and tags that must match) in a part's
/// metrics.ndjson.gz, read line by line.
fn samples_of(dir: &Path, metric: &str, tags: &[(&str, &str)]) -> Option<Vec<f64>> {
    let file = std::fs::File::open(dir.join("metrics.ndjson.gz")).ok()?;
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    for line in reader.lines() {
        let line = line.unwrap();
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["type"] != "Point" || v["metric"] != metric {
            continue;
        }
        if tags
            .iter()
            .all(|(k, val)| v["data"]["tags"][*k].as_str() == Some(*val))
        {
            out.push(v["data"]["value"].as_f64().unwrap());
        }
    }
    Some(out)
}

/// k6's percentile (metrics/sink.go): sort, i = p·(n−1), interpolate linearly.
fn k6_percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let i = p / 100.0 * (n - 1) as f64;
            let (lo, hi) = (i.floor() as usize, i.ceil() as usize);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (i - i.floor())
        }
    }
}

/// Scaled as the worker stores a non-time value: × 1000, rounded half away from zero.
fn milli(v: f64) -> i64 {
    (v * 1000.0).round() as i64
}

/// The union of every part's samples, sorted.
fn union(dirs: &[PathBuf], metric: &str, tags: &[(&str, &str)]) -> Vec<f64> {
    let mut all: Vec<f64> = dirs
        .iter()
        .flat_map(|d| samples_of(d, metric, tags).unwrap_or_default())
        .collect();
    all.sort_by(f64::total_cmp);
    all
}

fn sum_counter(dirs: &[PathBuf], metric: &str, stat: &str) -> f64 {
    dirs.iter()
        .filter_map(|d| summary_of(d))
        .filter_map(|s| s["metrics"][metric]["values"][stat].as_f64())
        .sum()
}

async fn ingest_part(ing: &Ingestor, dir: &Path) -> k6_ingest::ingest::IngestReport {
    let msg = message(dir);
    ing.ingest_one(&msg, &ctx(dir))
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// The part directories of a split run, and the run's id.
fn split_run(version: &str, case: &str) -> (Vec<PathBuf>, Uuid) {
    let dirs = part_dirs(version, case);
    let run = run_id(&dirs[0]);
    (dirs, run)
}

fn run_id(dir: &Path) -> Uuid {
    message(dir).run_id
}

struct Stored {
    status: String,
    total_requests: Option<i64>,
    p95_ms: Option<i64>,
    max_ms: Option<i64>,
    iterations: Option<i64>,
    checks_passed: Option<i64>,
    checks_failed: Option<i64>,
    thresholds_failed: Option<i32>,
    merged_parts: Option<String>,
    error_details: Option<String>,
    warnings: Value,
}

async fn stored(pool: &PgPool, run: Uuid) -> Option<Stored> {
    let r = sqlx::query(
        "SELECT p.status, p.total_requests, p.p95_response_time_ms, p.max_response_time_ms, p.iterations_total, \
             p.checks_passed, p.checks_failed, p.thresholds_failed, p.value_sources ->> 'merged_parts', \
             r.error_details, p.warnings \
         FROM k6_performance_runs p JOIN runs r ON r.id = p.run_id WHERE p.run_id = $1",
    )
    .bind(run)
    .fetch_optional(pool)
    .await
    .unwrap()?;
    Some(Stored {
        status: r.get(0),
        total_requests: r.get(1),
        p95_ms: r.get(2),
        max_ms: r.get(3),
        iterations: r.get(4),
        checks_passed: r.get(5),
        checks_failed: r.get(6),
        thresholds_failed: r.get(7),
        merged_parts: r.get(8),
        error_details: r.get(9),
        warnings: r.get::<sqlx::types::Json<Value>, _>(10).0,
    })
}

/// `(value, min, max, avg, med, p90, p95)` of a metric's history row.
/// Asserts the merged run is stored as `error` with details that say `why`.
async fn assert_error_run(pool: &PgPool, run: Uuid, why: &str) -> Stored {
    let got = stored(pool, run).await.unwrap();
    assert_eq!(got.status, "error");
    let details = got.error_details.as_deref().unwrap_or_default();
    assert!(details.contains(why), "{details:?}");
    got
}

async fn history(pool: &PgPool, run: Uuid, metric: &str) -> BTreeMap<&'static str, Option<i64>> {
    let r = sqlx::query(
        "SELECT h.value, h.min_value, h.max_value, h.avg_value, h.med_value, h.p90_value, h.p95_value, h.count \
         FROM k6_metrics_history h JOIN k6_performance_runs p ON p.id = h.k6_run_id \
         WHERE p.run_id = $1 AND h.metric_name = $2",
    )
    .bind(run)
    .bind(metric)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{metric}: {e}"));
    ["value", "min", "max", "avg", "med", "p90", "p95", "count"]
        .into_iter()
        .enumerate()
        .map(|(i, k)| (k, r.get::<Option<i64>, _>(i)))
        .collect()
}

async fn threshold_ok(pool: &PgPool, run: Uuid, metric: &str, expr: &str) -> bool {
    sqlx::query_scalar(
        "SELECT t.ok FROM k6_threshold_results t JOIN k6_performance_runs p ON p.id = t.k6_run_id \
         WHERE p.run_id = $1 AND t.metric_name = $2 AND t.expression = $3",
    )
    .bind(run)
    .bind(metric)
    .bind(expr)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| panic!("{metric} {expr}: {e}"))
}

async fn checks(pool: &PgPool, run: Uuid) -> BTreeMap<String, (i64, i64)> {
    sqlx::query(
        "SELECT c.path, c.passes, c.fails FROM k6_check_results c JOIN k6_performance_runs p ON p.id = c.k6_run_id \
         WHERE p.run_id = $1",
    )
    .bind(run)
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), (r.get(1), r.get(2))))
    .collect()
}

/// Checks summed by path over the parts' summaries (root_group tree), as the test reads it.
fn expected_checks(dirs: &[PathBuf]) -> BTreeMap<String, (i64, i64)> {
    fn walk(g: &Value, out: &mut BTreeMap<String, (i64, i64)>) {
        for c in g["checks"].as_array().into_iter().flatten() {
            let e = out
                .entry(c["path"].as_str().unwrap().to_string())
                .or_default();
            e.0 += c["passes"].as_i64().unwrap();
            e.1 += c["fails"].as_i64().unwrap();
        }
        for sub in g["groups"].as_array().into_iter().flatten() {
            walk(sub, out);
        }
    }
    let mut out = BTreeMap::new();
    for s in dirs.iter().filter_map(|d| summary_of(d)) {
        walk(&s["root_group"], &mut out);
    }
    out
}

/// Every value the merge must produce for `split*-merged-fail` / `-pass`, from the files.
async fn assert_merged(pool: &PgPool, dirs: &[PathBuf], merged_fail: bool) {
    let run = run_id(&dirs[0]);
    let n = dirs.len();
    let got = stored(pool, run)
        .await
        .expect("a merged k6_performance_runs row");
    assert_eq!(
        got.merged_parts.as_deref(),
        Some(format!("{n} of {n}").as_str())
    );

    // counters summed
    let iterations = sum_counter(dirs, "iterations", "count");
    assert_eq!(
        iterations, 40.0,
        "the script's 40 shared iterations over all parts"
    );
    assert_eq!(got.iterations, Some(40));
    assert_eq!(
        got.total_requests,
        Some(sum_counter(dirs, "http_reqs", "count") as i64)
    );
    let items = history(pool, run, "split_items").await;
    assert_eq!(
        items["value"].or(items["count"]),
        Some(milli(sum_counter(dirs, "split_items", "count")))
    );

    // trend: exact over the union of samples
    let all = union(dirs, "split_value", &[]);
    assert_eq!(all.len(), 400, "10 samples per iteration");
    let h = history(pool, run, "split_value").await;
    assert_eq!(h["min"], Some(milli(all[0])));
    assert_eq!(h["max"], Some(milli(*all.last().unwrap())));
    assert_eq!(
        h["avg"],
        Some(milli(all.iter().sum::<f64>() / all.len() as f64))
    );
    assert_eq!(h["med"], Some(milli(k6_percentile(&all, 50.0))));
    assert_eq!(h["p90"], Some(milli(k6_percentile(&all, 90.0))));
    assert_eq!(h["p95"], Some(milli(k6_percentile(&all, 95.0))));
    // not an average of the parts' p(90)s
    let avg_of_p90: f64 = dirs
        .iter()
        .map(|d| {
            summary_of(d).unwrap()["metrics"]["split_value"]["values"]["p(90)"]
                .as_f64()
                .unwrap()
        })
        .sum::<f64>()
        / n as f64;
    assert_ne!(h["p90"], Some(milli(avg_of_p90)));

    let big = union(dirs, "split_value", &[("kind", "big")]);
    let hb = history(pool, run, "split_value{kind:big}").await;
    assert_eq!(hb["p95"], Some(milli(k6_percentile(&big, 95.0))));
    assert_eq!(hb["max"], Some(milli(*big.last().unwrap())));

    // response times: whole milliseconds of the union of http_req_duration samples
    let dur = union(dirs, "http_req_duration", &[]);
    assert_eq!(got.p95_ms, Some(k6_percentile(&dur, 95.0).round() as i64));
    assert_eq!(got.max_ms, Some(dur.last().unwrap().round() as i64));

    // checks by path, summed
    let want = expected_checks(dirs);
    assert_eq!(checks(pool, run).await, want);
    assert_eq!(got.checks_passed, Some(want.values().map(|c| c.0).sum()));
    assert_eq!(got.checks_failed, Some(want.values().map(|c| c.1).sum()));
    assert_eq!(
        want["::outer::inner::part is 0"],
        (40 / n as i64, 40 - 40 / n as i64)
    );

    // thresholds judged again on the merged values, by hand here
    let p90 = k6_percentile(&all, 90.0);
    if merged_fail {
        for d in dirs {
            let s = summary_of(d).unwrap();
            assert_eq!(
                s["metrics"]["iterations"]["thresholds"]["count<25"]["ok"], true,
                "each part passed"
            );
        }
        assert!(!threshold_ok(pool, run, "iterations", "count<25").await);
        assert!(iterations >= 25.0);
        let items = sum_counter(dirs, "split_items", "count");
        assert_eq!(
            threshold_ok(pool, run, "split_items", "count<60").await,
            items < 60.0
        );
        assert_eq!(
            threshold_ok(pool, run, "split_value", "p(90)<1000").await,
            p90 < 1000.0
        );
        assert_eq!(
            threshold_ok(pool, run, "split_value", "min>=1").await,
            all[0] >= 1.0
        );
        assert_eq!(got.status, "failed");
        assert_eq!(got.thresholds_failed, Some(2));
    } else {
        let last = summary_of(dirs.last().unwrap()).unwrap();
        assert_eq!(
            last["metrics"]["split_value"]["thresholds"]["p(90)<100"]["ok"], false,
            "the last part failed"
        );
        assert!(p90 < 100.0, "{p90}");
        assert!(threshold_ok(pool, run, "split_value", "p(90)<100").await);
        assert!(threshold_ok(pool, run, "split_items{kind:small}", "count>0").await);
        assert_eq!(
            got.status, "passed",
            "the part's 99 was re-judged by the merge"
        );
        assert_eq!(got.thresholds_failed, Some(0));
    }
    assert!(threshold_ok(pool, run, "http_req_duration{name:ok}", "p(95)<5000").await);
    assert!(threshold_ok(pool, run, "checks{area:outer}", "rate>0.5").await);
    assert!(threshold_ok(pool, run, "split_value{kind:big}", "max<1000").await);
}

async fn parts_stored(pool: &PgPool, run: Uuid) -> i64 {
    value_of(
        pool,
        "SELECT count(*) FROM k6_run_parts WHERE run_id = $1",
        run,
    )
    .await
}

async fn forget(pool: &PgPool, run: Uuid) {
    sqlx::query("DELETE FROM runs WHERE id = $1")
        .bind(run)
        .execute(pool)
        .await
        .unwrap();
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn four_parts_in_every_order_and_twice_merge_to_the_exact_run(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    // every one of the 24 arrival orders for k6 1.1.0, four of them for 2.2.0
    let mut all_orders = Vec::new();
    for a in 0..4 {
        for b in 0..4 {
            for c in 0..4 {
                for d in 0..4 {
                    let o = [a, b, c, d];
                    if (0..4).all(|i| o.contains(&i)) {
                        all_orders.push(o);
                    }
                }
            }
        }
    }
    assert_eq!(all_orders.len(), 24);
    let some_orders = vec![[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1], [1, 3, 0, 2]];
    for (version, orders) in [("v1.1.0", all_orders), ("v2.2.0", some_orders)] {
        let dirs = part_dirs(version, "split4-merged-fail");
        assert_eq!(dirs.len(), 4);
        let run = run_id(&dirs[0]);
        for (n, order) in orders.iter().enumerate() {
            let duplicates = n < 4;
            for (k, i) in order.iter().enumerate() {
                ingest_part(&ing, &dirs[*i]).await;
                if k < 3 {
                    assert!(
                        stored(&pool, run).await.is_none(),
                        "{version} {order:?}: no merged row before the last part"
                    );
                    if duplicates {
                        // a duplicate of a part changes nothing
                        ingest_part(&ing, &dirs[*i]).await;
                    }
                    assert_eq!(parts_stored(&pool, run).await, k as i64 + 1);
                }
            }
            assert_merged(&pool, &dirs, true).await;
            if duplicates {
                // every part again: nothing written twice, the merge stays
                let before = table_digest(&pool).await;
                for d in &dirs {
                    ingest_part(&ing, d).await;
                }
                assert_eq!(table_digest(&pool).await, before, "{version} {order:?}");
            }
            forget(&pool, run).await;
        }
    }
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn thresholds_passing_on_every_part_fail_merged_and_a_part_99_passes_merged(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    for version in ["v1.1.0", "v2.2.0"] {
        for (case, merged_fail) in [
            ("split2-merged-fail", true),
            ("split2-merged-pass", false),
            ("split4-merged-pass", false),
        ] {
            let dirs = part_dirs(version, case);
            for d in &dirs {
                ingest_part(&ing, d).await;
            }
            assert_merged(&pool, &dirs, merged_fail).await;
        }
    }
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn two_last_parts_committing_at_once_merge_once(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    let (dirs, run) = split_run("v1.1.0", "split4-merged-fail");
    for round in 0..3 {
        ingest_part(&ing, &dirs[0]).await;
        ingest_part(&ing, &dirs[1]).await;
        let (a, b) = tokio::join!(ingest_part(&ing, &dirs[2]), ingest_part(&ing, &dirs[3]));
        assert_eq!(a.run_id, b.run_id);
        let rows: i64 = value_of(
            &pool,
            "SELECT count(*) FROM k6_performance_runs WHERE run_id = $1",
            run,
        )
        .await;
        assert_eq!(rows, 1, "round {round}");
        assert_eq!(parts_stored(&pool, run).await, 4);
        assert_merged(&pool, &dirs, true).await;
        forget(&pool, run).await;
    }
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_part_that_errored_makes_the_merged_run_error(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    for version in ["v1.1.0", "v2.2.0"] {
        let (dirs, run) = split_run(version, "split4-part-error");
        for d in &dirs {
            let msg = message(d);
            // The part without a summary (exit 107) is stored; its own status is error.
            let _ = ing.ingest_one(&msg, &ctx(d)).await;
        }
        let got = assert_error_run(&pool, run, "part 2 of 4").await;
        // what the three other parts measured is still merged
        let three: Vec<PathBuf> = dirs
            .iter()
            .filter(|d| summary_of(d).is_some())
            .cloned()
            .collect();
        assert_eq!(three.len(), 3);
        assert_eq!(
            got.iterations,
            Some(sum_counter(&three, "iterations", "count") as i64)
        );
        let part_status: String = value_of(
            &pool,
            "SELECT status FROM k6_run_parts WHERE run_id = $1 AND part_index = 2",
            run,
        )
        .await;
        assert_eq!(part_status, "error");
    }
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn without_every_part_s_samples_percentiles_are_null_with_the_reason(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    let dirs = part_dirs("v1.1.0", "split4-no-samples");
    assert!(!dirs[1].join("metrics.ndjson.gz").exists());
    let run = run_id(&dirs[0]);
    for d in &dirs {
        ingest_part(&ing, d).await;
    }
    let got = stored(&pool, run).await.unwrap();
    let h = history(&pool, run, "split_value").await;
    assert_eq!(h["p90"], None);
    assert_eq!(h["med"], None);
    // min and max stay exact without samples
    let mins: Vec<f64> = dirs
        .iter()
        .map(|d| {
            summary_of(d).unwrap()["metrics"]["split_value"]["values"]["min"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        h["min"],
        Some(milli(mins.iter().copied().fold(f64::INFINITY, f64::min)))
    );
    assert_eq!(h["max"], Some(milli(500.0)));
    let warnings = got.warnings.to_string();
    assert!(
        warnings.contains("split_value") && warnings.contains("part 1"),
        "{warnings}"
    );
    assert_eq!(got.p95_ms, None, "{warnings}");
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn missing_parts_are_recorded_as_error_and_a_late_part_completes_the_run(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    let (dirs, run) = split_run("v2.2.0", "split4-merged-fail");
    for i in [0, 1, 3] {
        ingest_part(&ing, &dirs[i]).await;
    }
    // not yet overdue
    let swept = ing
        .sweep_incomplete_parts(std::time::Duration::from_secs(3600))
        .await
        .unwrap();
    assert!(swept.is_empty());
    assert!(stored(&pool, run).await.is_none());
    let swept = ing
        .sweep_incomplete_parts(std::time::Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(swept, vec![run]);
    let got = assert_error_run(&pool, run, "3 of 4 parts").await;
    assert_eq!(got.merged_parts.as_deref(), Some("3 of 4"));
    let three = [dirs[0].clone(), dirs[1].clone(), dirs[3].clone()];
    assert_eq!(
        got.iterations,
        Some(sum_counter(&three, "iterations", "count") as i64)
    );
    let run_status: String = value_of(&pool, "SELECT status FROM runs WHERE id = $1", run).await;
    assert_eq!(run_status, "error");
    // a second sweep finds nothing to do
    assert!(
        ing.sweep_incomplete_parts(std::time::Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );

    ingest_part(&ing, &dirs[2]).await;
    assert_merged(&pool, &dirs, true).await;
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn replaying_a_directory_of_parts_gives_the_same_rows_as_one_by_one(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    let case = split_fixtures().join("v1.1.0").join("split4-merged-pass");
    let rows = k6_ingest::replay::replay(&ing, std::slice::from_ref(&case), false, 4, 1 << 20)
        .await
        .unwrap();
    assert_eq!(rows.len(), 4);
    assert!(
        rows.iter().all(|r| r.result.is_ok()),
        "{}",
        k6_ingest::replay::render_table(&rows)
    );
    let dirs = part_dirs("v1.1.0", "split4-merged-pass");
    assert_merged(&pool, &dirs, false).await;
}

/// A part whose summary was missing is stored as `error` (and the message dead-lettered);
/// replayed after the fix, it replaces its error record and the run is merged again.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_part_replayed_with_its_summary_replaces_its_error_record_and_the_merge(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    let (dirs, run) = split_run("v1.1.0", "split4-merged-fail");
    let good = message(&dirs[1]);
    let mut broken = good.clone();
    broken.artifacts.summary = Some("no-such-summary.json".into());
    for i in [0, 2, 3] {
        ingest_part(&ing, &dirs[i]).await;
    }
    let e = ing.ingest_one(&broken, &ctx(&dirs[1])).await.unwrap_err();
    assert!(e.to_string().contains("summary"), "{e}");
    assert_error_run(&pool, run, "part 1 of 4").await;
    // the same broken message again changes nothing
    let before = table_digest(&pool).await;
    ing.ingest_one(&broken, &ctx(&dirs[1])).await.unwrap();
    assert_eq!(table_digest(&pool).await, before);

    let report = ing.ingest_one(&good, &ctx(&dirs[1])).await.unwrap();
    assert_eq!(report.outcome, k6_ingest::ingest::Outcome::Replaced);
    assert_eq!(parts_stored(&pool, run).await, 4);
    assert_merged(&pool, &dirs, true).await;
}

/// `k6-ingest replay` as a user runs it: with a part missing it records the run as
/// `error` at its end (ingest.part_wait_secs = 0 here); replayed with the late part, the
/// run is merged.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn replay_records_missing_parts_at_its_end_and_a_later_replay_completes_the_run(
    pool: PgPool,
) {
    let s = settings();
    store(&s).await;
    let url = database_url(&pool);
    let (dirs, run) = split_run("v1.1.0", "split4-merged-fail");
    let tmp = tempfile::tempdir().unwrap();
    for i in [0, 1, 3] {
        copy_dir(&dirs[i], &tmp.path().join(format!("part-{i}")));
    }
    let replay = || {
        command(&["replay", tmp.path().to_str().unwrap()], &url, &s)
            .env("K6_INGEST__INGEST__PART_WAIT_SECS", "0")
            .output()
            .unwrap()
    };
    let out = replay();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!("run {run}: parts missing")),
        "{stdout}"
    );
    let got = stored(&pool, run).await.unwrap();
    assert_eq!(got.status, "error");
    assert!(got.error_details.unwrap().contains("3 of 4 parts"));

    copy_dir(&dirs[2], &tmp.path().join("part-2"));
    let out = replay();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains("parts missing"), "{stdout}");
    assert_merged(&pool, &dirs, true).await;
}

/// A split run of a month that has no partitions (a backfill from 2019) is stored: its
/// month's partitions are made before a part's transaction opens, as a whole run's are
/// made when its write finds none.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_split_run_of_a_month_without_partitions_is_stored(pool: PgPool) {
    let ing = split_ingestor(&pool).await;
    let (dirs, run) = split_run("v1.1.0", "split4-merged-fail");
    let start: chrono::DateTime<chrono::Utc> = "2019-03-04T05:06:07Z".parse().unwrap();
    for dir in &dirs {
        let mut msg = message(dir);
        let took = msg.completed_at.map(|c| c - msg.started_at);
        msg.started_at = start;
        msg.completed_at = took.map(|d| start + d);
        ing.ingest_one(&msg, &ctx(dir))
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    }
    let row = sqlx::query(
        "SELECT extract(year FROM started_at)::int, status FROM k6_performance_runs WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.get::<i32, _>(0), 2019);
    assert_ne!(row.get::<String, _>(1), "error");
}
