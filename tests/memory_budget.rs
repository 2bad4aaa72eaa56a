//! The memory budget holds whatever a run's artifacts contain: the real binary replays
//! an unmodified fixture run (the baseline) and hostile variants of it, each with one
//! artifact replaced, and the kernel's peak-RSS figure of every process is compared with
//! the baseline's. Memory, not time, is asserted, together with what was stored.
//!
//! Run with `--no-capture` to see the figures.

mod harness;

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;

use harness::*;
use k6_ingest::config::Settings;
use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

/// A run in flight may cost at most this much more than the baseline (README "Memory budget").
const RUN_BUDGET_KIB: i64 = 64 * 1024;

struct Replayed {
    code: i32,
    peak_kib: i64,
}

/// Replays `dir` with the real binary; returns its exit status and its own peak RSS.
fn replay(dir: &Path, db_url: &str, s: &Settings) -> Replayed {
    replay_with(dir, db_url, s, &[])
}

fn replay_with(dir: &Path, db_url: &str, s: &Settings, env: &[(&str, &str)]) -> Replayed {
    let mut cmd = replay_command(dir, db_url, s);
    cmd.envs(env.iter().copied());
    let (code, peak_kib) = forked_exit_and_peak_rss(&mut cmd);
    Replayed { code, peak_kib }
}

/// A copy of the `thresholds-pass` run under a fresh run id.
fn run_dir() -> (tempfile::TempDir, Uuid) {
    fresh_run_dir("v1.1.0", "thresholds-pass")
}

/// About `inflated` bytes of `byte` without a newline, gzip'd: 64 MiB streamed through
/// flate2 once, the member then repeated (a multi-member gzip file is one file to every
/// reader).
fn write_gzip_bomb(path: &Path, byte: u8, inflated: u64) -> u64 {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    let chunk = vec![byte; MIB as usize];
    for _ in 0..64 {
        enc.write_all(&chunk).unwrap();
    }
    let member = enc.finish().unwrap();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for _ in 0..inflated / (64 * MIB) {
        f.write_all(&member).unwrap();
    }
    f.flush().unwrap();
    std::fs::metadata(path).unwrap().len()
}

/// The summary of `thresholds-pass` with `n` more metrics, each a copy of `template`
/// under the key `name{tag:i}`.
fn summary_with_copies(dir: &Path, template: &str, name: &str, n: usize, pad: usize) -> Vec<u8> {
    let mut doc = read_json(&dir.join("summary.json"));
    let metrics = doc["metrics"].as_object_mut().unwrap();
    let copy = metrics[template].clone();
    let padding = "x".repeat(pad);
    for i in 0..n {
        metrics.insert(format!("{name}{{tag:{padding}{i}}}"), copy.clone());
    }
    serde_json::to_vec(&doc).unwrap()
}

#[derive(Debug)]
struct Stored {
    status: String,
    error_details: Option<String>,
    p99_ms: Option<i64>,
    warnings: Vec<String>,
    metric_rows: i64,
}

async fn stored(pool: &PgPool, run_id: Uuid) -> Stored {
    let (status, error_details) = run_status(pool, run_id).await;
    let (p99_ms, warnings): (Option<i64>, Value) = row_of(
        pool,
        "SELECT p99_response_time_ms, warnings FROM k6_performance_runs WHERE run_id = $1",
        run_id,
    )
    .await;
    Stored {
        status,
        error_details,
        p99_ms,
        warnings: serde_json::from_value(warnings).unwrap(),
        metric_rows: metric_rows(pool, run_id).await,
    }
}

/// Asserts that the run is stored as `error` with a reason that says `why`.
async fn assert_error_run(pool: &PgPool, run_id: Uuid, why: &str) {
    let row = stored(pool, run_id).await;
    assert_eq!(row.status, "error");
    let reason = row.error_details.unwrap_or_default();
    assert!(reason.contains(why), "{reason}");
}

/// Values of the 30 M-sample file: whole microseconds, so the test can sort them by
/// counting, and every block of lines distinct from the next.
const SAMPLE_BLOCKS: u64 = 8;
const BLOCK_LINES: u64 = 100_000;
const MAX_MICROS: usize = 2_000_000;

fn micros(block: u64, i: u64) -> usize {
    // A cheap deterministic mix, skewed like response times: most fast, a long tail.
    let x = (block * BLOCK_LINES + i).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33;
    let u = (x % 1_000_000) as f64 / 1_000_000.0;
    ((100.0 + 400.0 * u + 1_500_000.0 * u.powi(12)) as usize).min(MAX_MICROS - 1)
}

/// Writes `repeats` × `SAMPLE_BLOCKS` × `BLOCK_LINES` k6 sample lines for
/// http_req_duration (each block compressed once, then repeated as gzip members) and
/// returns how often each microsecond value occurs.
fn write_samples(path: &Path, repeats: u64) -> Vec<u32> {
    let mut hist = vec![0u32; MAX_MICROS];
    let mut members = Vec::new();
    for b in 0..SAMPLE_BLOCKS {
        let mut text = String::with_capacity(BLOCK_LINES as usize * 160);
        for i in 0..BLOCK_LINES {
            let us = micros(b, i);
            hist[us] += repeats as u32;
            writeln!(
                text,
                "{{\"metric\":\"http_req_duration\",\"type\":\"Point\",\"data\":{{\"time\":\"2026-11-22T03:04:13.{:09}Z\",\"value\":{}.{:03},\"tags\":{{\"scenario\":\"default\",\"status\":\"200\"}}}}}}",
                i,
                us / 1000,
                us % 1000
            )
            .unwrap();
        }
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        members.push(enc.finish().unwrap());
    }
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for _ in 0..repeats {
        for m in &members {
            f.write_all(m).unwrap();
        }
    }
    f.flush().unwrap();
    hist
}

/// k6's percentile over the histogram: the value at a rank is found by counting.
fn hist_percentile(hist: &[u32], n: u64, p: f64) -> f64 {
    let at = |rank: u64| {
        let mut seen = 0u64;
        for (us, &c) in hist.iter().enumerate() {
            seen += u64::from(c);
            if seen > rank {
                return us as f64 / 1000.0;
            }
        }
        unreachable!("rank {rank} beyond {n}")
    };
    let i = (p / 100.0) * (n - 1) as f64;
    let (lo, hi) = (at(i.floor() as u64), at(i.ceil() as u64));
    lo + (hi - lo) * (i - i.floor())
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn hostile_artifacts_stay_within_the_memory_budget(pool: PgPool) {
    let s = settings();
    store(&s).await; // the bucket
    let db_url = database_url(&pool);

    // Baseline: the fixture as k6 wrote it.
    let (dir, run) = run_dir();
    let base_run = replay(dir.path(), &db_url, &s);
    assert_eq!(base_run.code, 0);
    let row = stored(&pool, run).await;
    assert_eq!(row.status, "passed");
    assert!(row.p99_ms.is_some(), "p(99) comes from the real samples");
    let baseline = base_run.peak_kib;
    eprintln!("peak RSS baseline (fixture as written): {baseline} KiB");
    // Prints each figure before judging it, so a failure still shows them all so far.
    let within = |what: &str, kib: i64| {
        eprintln!(
            "peak RSS {what}: {kib} KiB ({:+} KiB vs baseline)",
            kib - baseline
        );
        assert!(
            kib - baseline <= RUN_BUDGET_KIB,
            "{what}: peak RSS {kib} KiB, baseline {baseline} KiB: more than 64 MiB above"
        );
    };

    // a) a metrics file that inflates to 2 GiB of one byte, no newline.
    let (dir, run) = run_dir();
    let size = write_gzip_bomb(&dir.path().join("metrics.ndjson.gz"), b'0', 2048 * MIB);
    assert!(size < 4 * MIB, "{size}");
    let r = replay(dir.path(), &db_url, &s);
    assert_eq!(r.code, 0, "a useless samples file does not fail the run");
    let row = stored(&pool, run).await;
    assert_eq!(row.status, "passed");
    assert_eq!(row.p99_ms, None, "no samples, so no p(99)");
    assert!(
        row.warnings
            .iter()
            .any(|w| w.contains("1 lines were not valid JSON or longer")),
        "{:?}",
        row.warnings
    );
    within(
        "a) metrics gzip bomb (2 MiB -> 2 GiB, no newline)",
        r.peak_kib,
    );
    // The same file with an inflated-size cap below its size: refused while it streams.
    let (dir2, run) = run_dir();
    std::fs::copy(
        dir.path().join("metrics.ndjson.gz"),
        dir2.path().join("metrics.ndjson.gz"),
    )
    .unwrap();
    drop(dir);
    let r = replay_with(
        dir2.path(),
        &db_url,
        &s,
        &[("K6_INGEST__FETCH__MAX_SAMPLES_INFLATED_BYTES", "1073741824")],
    );
    assert_eq!(r.code, 0);
    let row = stored(&pool, run).await;
    assert_eq!((row.status.as_str(), row.p99_ms), ("passed", None));
    assert!(
        row.warnings.iter().any(|w| w.contains(
            "percentiles not computed: more than 1073741824 bytes once inflated (fetch.max_samples_inflated_bytes)"
        )),
        "{:?}",
        row.warnings
    );
    within(
        "a2) the same bomb, fetch.max_samples_inflated_bytes = 1 GiB",
        r.peak_kib,
    );

    // b) a 200 MiB line of a sample without a newline, plain (a short name: the test S3
    // server caps multipart keys near 120 bytes).
    let (dir, run) = run_dir();
    {
        let msg = dir.path().join("message.json");
        let mut m = read_json(&msg);
        m["artifacts"]["metrics"] = "m.ndjson".into();
        std::fs::write(&msg, m.to_string()).unwrap();
        std::fs::remove_file(dir.path().join("metrics.ndjson.gz")).unwrap();
        let mut f =
            std::io::BufWriter::new(std::fs::File::create(dir.path().join("m.ndjson")).unwrap());
        f.write_all(br#"{"metric":"http_req_duration","type":"Point","data":{"time":"2026-11-22T03:04:13Z","value":1,"tags":{"url":""#)
            .unwrap();
        let chunk = vec![b'a'; MIB as usize];
        for _ in 0..200 {
            f.write_all(&chunk).unwrap();
        }
        f.flush().unwrap();
    }
    let r = replay(dir.path(), &db_url, &s);
    assert_eq!(r.code, 0);
    let row = stored(&pool, run).await;
    assert_eq!(row.status, "passed");
    assert_eq!(
        row.p99_ms, None,
        "the long line was a duration sample: set incomplete"
    );
    within("b) metrics line of 200 MiB without a newline", r.peak_kib);

    // c) a summary with 100,000 metrics (copies of a real one): above the summary caps.
    let (dir, run) = run_dir();
    let doc = summary_with_copies(dir.path(), "iterations", "m", 100_000, 0);
    let doc_len = doc.len();
    assert!(doc_len > 2 * MIB as usize, "{doc_len}");
    std::fs::write(dir.path().join("summary.json"), doc).unwrap();
    let r = replay(dir.path(), &db_url, &s);
    assert_eq!(r.code, 1, "an unusable summary fails the replay");
    assert_error_run(&pool, run, "larger than the limit").await;
    within("c) summary with 100,000 metrics (~10 MB)", r.peak_kib);

    // c2) the same metrics in less than the byte cap: refused by the metric cap, read first.
    let (dir, run) = run_dir();
    let doc = summary_with_copies(dir.path(), "iterations", "m", 12_000, 0);
    std::fs::write(dir.path().join("summary.json"), gzip(&doc)).unwrap();
    let r = replay(dir.path(), &db_url, &s);
    assert_eq!(r.code, 1);
    assert_error_run(
        &pool,
        run,
        "more than the 10000 metrics allowed (ingest.max_metrics)",
    )
    .await;
    within("c2) summary with 12,000 metrics, gzip'd", r.peak_kib);

    // c3) about the largest summary the defaults accept: 9,000 more trend metrics,
    // ~1.7 MB, ~92,000 JSON values.
    let (dir, run) = run_dir();
    let doc = summary_with_copies(dir.path(), "http_req_waiting", "w", 9_000, 0);
    let doc_len = doc.len();
    assert!(
        doc_len > 3 * MIB as usize / 2 && doc_len < 2 * MIB as usize,
        "{doc_len}"
    );
    std::fs::write(dir.path().join("summary.json"), doc).unwrap();
    let r = replay(dir.path(), &db_url, &s);
    assert_eq!(r.code, 0);
    let row = stored(&pool, run).await;
    assert_eq!(row.status, "passed");
    assert_eq!(row.metric_rows, 9_000 + 17);
    within(
        "c3) largest accepted summary (~1.7 MB, 9,017 metrics)",
        r.peak_kib,
    );

    // d) a summary gzip bomb: 2 GiB of spaces.
    let (dir, run) = run_dir();
    let size = write_gzip_bomb(&dir.path().join("summary.json"), b' ', 2048 * MIB);
    assert!(size < 4 * MIB, "{size}");
    let r = replay(dir.path(), &db_url, &s);
    assert_eq!(r.code, 1);
    assert_error_run(&pool, run, "larger than the limit of 2097152").await;
    within("d) summary gzip bomb (2 MiB -> 2 GiB)", r.peak_kib);

    // e) 30 M real-looking samples: percentiles exact, memory flat.
    let repeats = 30_000_000 / (SAMPLE_BLOCKS * BLOCK_LINES);
    let n = repeats * SAMPLE_BLOCKS * BLOCK_LINES;
    let (dir, run) = run_dir();
    // A short name: the test S3 server caps multipart keys near 120 bytes.
    {
        let msg = dir.path().join("message.json");
        let mut m = read_json(&msg);
        m["artifacts"]["metrics"] = "m.ndjson.gz".into();
        std::fs::write(&msg, m.to_string()).unwrap();
    }
    let started = std::time::Instant::now();
    let hist = write_samples(&dir.path().join("m.ndjson.gz"), repeats);
    eprintln!("30 M samples written in {:?}", started.elapsed());
    let pct = |p: f64| hist_percentile(&hist, n, p);
    let first = hist.iter().position(|&c| c > 0).unwrap() as f64 / 1000.0;
    let last = hist.iter().rposition(|&c| c > 0).unwrap() as f64 / 1000.0;
    // The summary k6 would have written over these samples, without p(90)/p(95)/p(99):
    // min, med and max verify the samples, the rest comes from them.
    let mut doc = read_json(&dir.path().join("summary.json"));
    doc["metrics"]["http_req_duration"]["values"] = json!({
        "min": first, "max": last, "med": pct(50.0), "avg": 1.0,
    });
    std::fs::write(dir.path().join("summary.json"), doc.to_string()).unwrap();
    let started = std::time::Instant::now();
    let r = replay(dir.path(), &db_url, &s);
    eprintln!("30 M samples replayed in {:?}", started.elapsed());
    assert_eq!(r.code, 0);
    let row = stored(&pool, run).await;
    assert_eq!(row.status, "passed");
    assert_eq!(
        row.p99_ms,
        Some(pct(99.0).round() as i64),
        "{:?}",
        row.warnings
    );
    let (p90_us, p95_us, p99_us, sources): (Option<i64>, Option<i64>, Option<i64>, Value) = row_of(
        &pool,
        "SELECT h.p90_value, h.p95_value, h.p99_value, h.sources FROM k6_metrics_history h \
             JOIN k6_performance_runs p ON p.id = h.k6_run_id \
             WHERE p.run_id = $1 AND h.metric_name = 'http_req_duration'",
        run,
    )
    .await;
    assert_eq!(p90_us, Some((pct(90.0) * 1000.0).round() as i64));
    assert_eq!(p95_us, Some((pct(95.0) * 1000.0).round() as i64));
    assert_eq!(p99_us, Some((pct(99.0) * 1000.0).round() as i64));
    assert_eq!(sources["p(99)"], "samples");
    // The threshold `p(95)<1000` was judged on a percentile from the samples: bit for bit.
    let (observed, source): (Option<f64>, Option<String>) = row_of(
        &pool,
        "SELECT t.observed_raw, t.observed_source FROM k6_threshold_results t \
         JOIN k6_performance_runs p ON p.id = t.k6_run_id \
         WHERE p.run_id = $1 AND t.metric_name = 'http_req_duration'",
        run,
    )
    .await;
    assert_eq!(source.as_deref(), Some("samples"));
    assert_eq!(observed.map(f64::to_bits), Some(pct(95.0).to_bits()));
    within("e) 30,000,000 samples, exact percentiles", r.peak_kib);
}
