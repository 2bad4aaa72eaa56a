//! `ingest_one` and `replay` against real PostgreSQL and the real S3-compatible server.

mod harness;

use harness::*;
use k6_ingest::ingest::{Disposition, IngestContext, IngestError, Outcome};
use k6_ingest::replay::{render_table, replay};
use sqlx::{PgPool, Row};

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn replaying_every_fixture_twice_stores_each_run_once(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let rows = replay(ing, &[fixtures()], false, 4, 1 << 20).await.unwrap();
    let table = render_table(&rows);
    assert!(rows.iter().all(|r| r.result.is_ok()), "{table}");
    assert_eq!(rows.len(), all_fixture_runs().len());
    assert!(
        rows.iter()
            .all(|r| r.result.as_ref().unwrap().outcome == Outcome::Ingested),
        "{table}"
    );
    let first = table_digest(&pool).await;
    assert_eq!(first[0].1, rows.len() as i64, "one runs row per run");
    assert_eq!(
        first[1].1,
        rows.len() as i64,
        "one k6_performance_runs row per run"
    );

    let again = replay(ing, &[fixtures()], false, 4, 1 << 20).await.unwrap();
    assert!(
        again
            .iter()
            .all(|r| r.result.as_ref().unwrap().outcome == Outcome::AlreadyPresent),
        "{}",
        render_table(&again)
    );
    assert_eq!(
        table_digest(&pool).await,
        first,
        "a second replay changed rows"
    );
    // The table shows the stored numbers for runs already present.
    let again_table = render_table(&again);
    assert!(again_table.contains("already present"), "{again_table}");
    let tf = again
        .iter()
        .find(|r| r.label == "v1.1.0/thresholds-fail")
        .unwrap();
    assert_eq!(
        tf.result.as_ref().unwrap().line.status.as_deref(),
        Some("failed")
    );
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn stores_columns_details_and_artifacts(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "thresholds-fail");
    let msg = ingest_dir(ing, &dir).await;

    let run = sqlx::query("SELECT status, error_details, logs_s3_url, artifact_paths, organization_id FROM runs WHERE id = $1")
        .bind(msg.run_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(run.get::<String, _>("status"), "failed");
    let details: String = run.get("error_details");
    assert!(
        details.contains("http_req_duration p(95)<5") && details.contains("exit code 99"),
        "{details}"
    );

    // The log bytes in S3 are exactly the file the runner wrote.
    let store = &env.store;
    let key = run_key(store, &msg, "k6.log");
    assert_eq!(
        run.get::<Option<String>, _>("logs_s3_url"),
        Some(store.uri(&key))
    );
    assert_eq!(
        get_object(store, &key).await,
        std::fs::read(dir.join("k6.log")).unwrap()
    );
    let mkey = run_key(store, &msg, "metrics.ndjson.gz");
    assert_eq!(
        get_object(store, &mkey).await,
        std::fs::read(dir.join("metrics.ndjson.gz")).unwrap()
    );

    let perf = sqlx::query(
        "SELECT id, status, total_requests, failed_requests, p95_response_time_ms, p99_response_time_ms, \
         thresholds_passed, thresholds_total, thresholds_failed, checks_total, checks_passed, summary_json IS NOT NULL AS inline, \
         value_sources->>'p99_response_time_ms' AS p99_source, exit_code, k6_version FROM k6_performance_runs WHERE run_id = $1",
    )
    .bind(msg.run_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(perf.get::<String, _>("status"), "failed");
    assert_eq!(perf.get::<Option<i64>, _>("total_requests"), Some(66));
    assert_eq!(perf.get::<Option<i64>, _>("failed_requests"), Some(10));
    assert_eq!(
        perf.get::<Option<bool>, _>("thresholds_passed"),
        Some(false)
    );
    assert_eq!(perf.get::<Option<i32>, _>("thresholds_total"), Some(4));
    assert_eq!(perf.get::<Option<i32>, _>("thresholds_failed"), Some(2));
    assert_eq!(perf.get::<Option<i64>, _>("checks_total"), Some(38));
    assert_eq!(perf.get::<Option<i64>, _>("checks_passed"), Some(28));
    assert!(perf.get::<bool, _>("inline"));
    // The default summary has no p(99): it came from the raw samples, and says so.
    assert!(perf.get::<Option<i64>, _>("p99_response_time_ms").is_some());
    assert_eq!(
        perf.get::<Option<String>, _>("p99_source").as_deref(),
        Some("samples")
    );
    assert_eq!(perf.get::<Option<i32>, _>("exit_code"), Some(99));
    let k6_run_id: uuid::Uuid = perf.get("id");

    let failed: Vec<(String, String, Option<i64>)> = sqlx::query_as(
        "SELECT metric_name, expression, observed_value FROM k6_threshold_results WHERE k6_run_id = $1 AND NOT ok ORDER BY 1, 2",
    )
    .bind(k6_run_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(failed.len(), 2);
    assert_eq!(failed[0].0, "http_req_duration");
    assert_eq!(failed[0].1, "p(95)<5");
    // observed p(95) in microseconds: k6 judged 50.9 ms against 5 ms.
    assert!(failed[0].2.unwrap() > 5_000, "{failed:?}");
    assert_eq!(failed[1].0, "http_req_failed");

    let metrics: i64 = value_of(
        &pool,
        "SELECT count(*) FROM k6_metrics_history WHERE k6_run_id = $1",
        k6_run_id,
    )
    .await;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("summary.json")).unwrap()).unwrap();
    assert_eq!(
        metrics as usize,
        summary["metrics"].as_object().unwrap().len()
    );
}

/// (group path, name, passes, fails)
type CheckRow = (Vec<String>, String, Option<i64>, Option<i64>);

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn checks_keep_their_group_path(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "groups-nested-checks");
    let msg = ingest_dir(ing, &dir).await;
    let rows: Vec<CheckRow> = sqlx::query_as(
        "SELECT c.group_path, c.name, c.passes, c.fails FROM k6_check_results c \
         JOIN k6_performance_runs p ON p.id = c.k6_run_id WHERE p.run_id = $1 AND c.name = 'status is 200' ORDER BY c.position",
    )
    .bind(msg.run_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    let paths: Vec<Vec<String>> = rows.iter().map(|r| r.0.clone()).collect();
    assert_eq!(
        paths,
        vec![
            vec![],
            vec!["outer".to_string()],
            vec!["outer".to_string(), "inner".to_string()]
        ]
    );
    // The inner one always fails in the script.
    assert_eq!(rows[2].2, Some(0));
    assert!(rows[2].3.unwrap() > 0);
    let empty: i64 = value_of(&pool, "SELECT count(*) FROM k6_check_results c JOIN k6_performance_runs p ON p.id = c.k6_run_id WHERE p.run_id = $1 AND c.name = ''", msg.run_id).await;
    assert_eq!(empty, 1, "the empty-named check is stored");
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_message_for_another_tenant_is_refused(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "thresholds-pass");
    let msg = ingest_dir(ing, &dir).await;
    let before = table_digest(&pool).await;

    let mut other = msg.clone();
    other.organization_id = uuid::Uuid::now_v7();
    let err = ing.ingest_one(&other, &ctx(&dir)).await.unwrap_err();
    assert_eq!(err.class(), "tenant_mismatch", "{err}");
    assert_eq!(err.disposition(), Disposition::DeadLetter);
    assert_eq!(table_digest(&pool).await, before);

    // Also when the application created the runs row first and nothing else exists.
    let fresh = message(&fixture_dir("v1.1.0", "no-http"));
    sqlx::query(
        "INSERT INTO runs (id, organization_id, project_id, status) VALUES ($1, $2, $3, 'running')",
    )
    .bind(fresh.run_id)
    .bind(fresh.organization_id)
    .bind(uuid::Uuid::now_v7())
    .execute(&pool)
    .await
    .unwrap();
    let err = ing
        .ingest_one(&fresh, &ctx(&fixture_dir("v1.1.0", "no-http")))
        .await
        .unwrap_err();
    assert_eq!(err.class(), "tenant_mismatch");
    let n: i64 = value_of(
        &pool,
        "SELECT count(*) FROM k6_performance_runs WHERE run_id = $1",
        fresh.run_id,
    )
    .await;
    assert_eq!(n, 0);
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_run_the_application_started_is_completed_in_place(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "thresholds-pass");
    let msg = message(&dir);
    sqlx::query(
        "INSERT INTO runs (id, organization_id, project_id, status, metadata) VALUES ($1, $2, $3, 'running', '{\"by\":\"app\"}')",
    )
    .bind(msg.run_id)
    .bind(msg.organization_id)
    .bind(msg.project_id)
    .execute(&pool)
    .await
    .unwrap();
    ing.ingest_one(&msg, &ctx(&dir)).await.unwrap();
    let (status, by, case): (String, Option<String>, Option<String>) = row_of(
        &pool,
        "SELECT status, metadata->>'by', metadata->>'case' FROM runs WHERE id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(status, "passed");
    assert_eq!(
        by.as_deref(),
        Some("app"),
        "the application's metadata is kept"
    );
    assert_eq!(case.as_deref(), Some("thresholds-pass"));
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_missing_summary_is_an_error_run_until_the_summary_is_fixed(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    let summary = std::fs::read(dir.path().join("summary.json")).unwrap();
    std::fs::remove_file(dir.path().join("summary.json")).unwrap();
    let msg = message(dir.path());

    let err = ing.ingest_one(&msg, &ctx(dir.path())).await.unwrap_err();
    assert!(matches!(err, IngestError::SummaryUnusable { .. }), "{err}");
    assert_eq!(err.disposition(), Disposition::DeadLetter);
    let (status, details): (String, String) = run_status(&pool, msg.run_id).await;
    assert_eq!(status, "error");
    assert!(
        details.contains("not found") && details.contains("exit code 0"),
        "{details}"
    );

    // Replayed after the fix, the error record is replaced by the real one.
    std::fs::write(dir.path().join("summary.json"), summary).unwrap();
    let report = ing.ingest_one(&msg, &ctx(dir.path())).await.unwrap();
    assert_eq!(report.outcome, Outcome::Replaced);
    let (status, n): (String, i64) = row_of(&pool, "SELECT p.status, (SELECT count(*) FROM k6_metrics_history m WHERE m.k6_run_id = p.id) FROM k6_performance_runs p WHERE p.run_id = $1", msg.run_id).await;
    assert_eq!(status, "passed");
    assert!(n > 5);
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM k6_performance_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    // And once complete, it is final.
    assert_eq!(
        ing.ingest_one(&msg, &ctx(dir.path()))
            .await
            .unwrap()
            .outcome,
        Outcome::AlreadyPresent
    );
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_corrupt_summary_is_kept_in_s3_and_reported(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    std::fs::write(
        dir.path().join("summary.json"),
        b"{\"metrics\": {\"http_reqs\": ",
    )
    .unwrap();
    let msg = message(dir.path());
    let err = ing.ingest_one(&msg, &ctx(dir.path())).await.unwrap_err();
    assert!(err.to_string().contains("not valid JSON"), "{err}");
    let paths: serde_json::Value = value_of(
        &pool,
        "SELECT artifact_paths FROM runs WHERE id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(paths["summary"]["unreadable"], true);
    let store = &env.store;
    let key = run_key(store, &msg, "summary.json");
    assert_eq!(
        get_object(store, &key).await,
        b"{\"metrics\": {\"http_reqs\": "
    );
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_script_error_without_summary_is_a_stored_error_run(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "script-error");
    let msg = ingest_dir(ing, &dir).await;
    let (status, details, logs): (String, String, Option<String>) = row_of(
        &pool,
        "SELECT status, error_details, logs_s3_url FROM runs WHERE id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(status, "error");
    assert!(
        details.contains("107") && details.contains("script exception"),
        "{details}"
    );
    assert!(logs.is_some(), "the logs that explain the error are kept");
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_summary_over_the_inline_limit_lives_in_s3(pool: PgPool) {
    let mut s = settings();
    s.s3.inline_summary_max_bytes = 100;
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "custom-metrics");
    let msg = ingest_dir(ing, &dir).await;
    let (inline, url): (Option<serde_json::Value>, Option<String>) = row_of(
        &pool,
        "SELECT summary_json, summary_s3_url FROM k6_performance_runs WHERE run_id = $1",
        msg.run_id,
    )
    .await;
    assert!(inline.is_none());
    let store = &env.store;
    let key = run_key(store, &msg, "summary.json");
    assert_eq!(url, Some(store.uri(&key)));
    assert_eq!(
        get_object(store, &key).await,
        std::fs::read(dir.join("summary.json")).unwrap()
    );
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn concurrent_duplicates_store_one_run(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "scenarios");
    let msg = message(&dir);
    let c = ctx(&dir);
    let results = futures_util::future::join_all((0..4).map(|_| ing.ingest_one(&msg, &c))).await;
    let outcomes: Vec<Outcome> = results.into_iter().map(|r| r.unwrap().outcome).collect();
    assert_eq!(
        outcomes.iter().filter(|o| **o == Outcome::Ingested).count(),
        1,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes
            .iter()
            .filter(|o| **o == Outcome::AlreadyPresent)
            .count(),
        3,
        "{outcomes:?}"
    );
    let digest = table_digest(&pool).await;
    assert_eq!(digest[0].1, 1);
    assert_eq!(digest[1].1, 1);
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_dry_run_writes_nothing(pool: PgPool) {
    let s = settings();
    let ing = dry_run_ingestor(&pool, &s).await;
    let rows = replay(&ing, &[fixtures().join("v0.57.0")], true, 2, 1 << 20)
        .await
        .unwrap();
    assert!(
        rows.iter()
            .all(|r| r.result.as_ref().unwrap().outcome == Outcome::DryRun),
        "{}",
        render_table(&rows)
    );
    for (table, n, _) in table_digest(&pool).await {
        assert_eq!(n, 0, "{table} written by a dry run");
    }
    assert_eq!(
        all_keys(&store(&s).await).await,
        Vec::<String>::new(),
        "a dry run uploaded objects"
    );
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn artifacts_can_come_from_s3(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let (s, ing) = (&env.s, &env.ing);
    let store = &env.store;
    let dir = fixture_dir("v1.1.0", "html-report");
    let mut msg = message(&dir);
    // Where `submit` stages them: the only place s3 sources may be by default.
    let staged = |m: &k6_ingest::message::RunCompleted, f: &str| {
        k6_ingest::s3::ArtifactStore::key_with_prefix(
            &s.s3.staging_prefix,
            m.organization_id,
            m.project_id,
            m.run_id,
            f,
        )
    };
    for f in ["summary.json", "k6.log", "report.html", "metrics.ndjson.gz"] {
        store
            .upload_file(&dir.join(f), &staged(&msg, f), "application/octet-stream")
            .await
            .unwrap();
    }
    let uri = |m: &k6_ingest::message::RunCompleted, f: &str| {
        Some(format!("s3://{}/{}", store.bucket(), staged(m, f)))
    };
    msg.artifacts.summary = uri(&msg, "summary.json");
    msg.artifacts.logs = uri(&msg, "k6.log");
    msg.artifacts.report_html = uri(&msg, "report.html");
    msg.artifacts.metrics = uri(&msg, "metrics.ndjson.gz");
    let report = ing
        .ingest_one(&msg, &IngestContext::default())
        .await
        .unwrap();
    assert_eq!(report.outcome, Outcome::Ingested);
    let key = run_key(store, &msg, "report.html");
    assert_eq!(
        get_object(store, &key).await,
        std::fs::read(dir.join("report.html")).unwrap()
    );

    // A missing staged summary is a permanent fault, recorded on the run.
    let mut gone = message(&fixture_dir("v1.1.0", "json-logs"));
    gone.artifacts.summary = uri(&gone, "no-such-summary.json");
    gone.artifacts.logs = None;
    gone.artifacts.metrics = None;
    let err = ing
        .ingest_one(&gone, &IngestContext::default())
        .await
        .unwrap_err();
    assert_eq!(err.disposition(), Disposition::DeadLetter, "{err}");
    assert!(err.to_string().contains("not found"), "{err}");
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn large_artifacts_go_up_in_equal_multipart_parts(pool: PgPool) {
    let mut s = settings();
    s.s3.part_size_bytes = 5 * 1024 * 1024;
    s.s3.multipart_threshold_bytes = 5 * 1024 * 1024;
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "json-logs");
    // 12 MiB of log lines: three parts (5 + 5 + 2 MiB).
    let line = "time=\"2026-11-22T01:31:09Z\" level=info msg=\"a log line of some length\" source=console\n";
    let mut log = String::new();
    while log.len() < 12 * 1024 * 1024 {
        log.push_str(line);
    }
    std::fs::write(dir.path().join("k6.log"), &log).unwrap();
    let msg = ingest_dir(ing, dir.path()).await;
    let store = &env.store;
    let key = run_key(store, &msg, "k6.log");
    assert_eq!(object_size(store, &key).await, log.len() as i64);
    assert_eq!(get_object(store, &key).await, log.as_bytes());
}

/// Stores that lack the SDK's trailing checksums get `s3.checksum = when_required`; both
/// single uploads and multipart work with it.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn uploads_work_with_checksums_only_when_required(pool: PgPool) {
    let mut s = settings();
    s.s3.checksum = k6_ingest::config::ChecksumMode::WhenRequired;
    s.s3.part_size_bytes = 5 * 1024 * 1024;
    s.s3.multipart_threshold_bytes = 5 * 1024 * 1024;
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "html-report");
    let log: Vec<u8> = (0..6 * 1024 * 1024)
        .map(|i| b"abcdefghij\n"[i % 11])
        .collect();
    std::fs::write(dir.path().join("k6.log"), &log).unwrap();
    let msg = ingest_dir(ing, dir.path()).await;
    let store = &env.store;
    for (name, want) in [
        ("k6.log", log),
        (
            "report.html",
            std::fs::read(dir.path().join("report.html")).unwrap(),
        ),
    ] {
        let key = run_key(store, &msg, name);
        assert_eq!(get_object(store, &key).await, want, "{name}");
    }
}

/// `extract` prints the columns keyed by column name: every key it prints is a column of
/// `k6_performance_runs`, and it prints every metric column of the table.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn extract_keys_are_the_tables_columns(pool: PgPool) {
    let columns: Vec<String> = sqlx::query_scalar(
        "SELECT column_name::text FROM information_schema.columns WHERE table_name = 'k6_performance_runs'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let dir = fixture_dir("v1.1.0", "thresholds-pass");
    let summary =
        k6_ingest::summary::parse_summary(&std::fs::read(dir.join("summary.json")).unwrap())
            .unwrap();
    let extracted =
        serde_json::to_value(k6_ingest::summary::extract(&summary, Some(0), None).columns).unwrap();
    let keys: Vec<&String> = extracted.as_object().unwrap().keys().collect();
    for k in &keys {
        assert!(
            columns.contains(k),
            "extract prints {k}, which is not a column"
        );
    }
    // Identity, timing and storage columns come from the message and the ingest, not the summary.
    let from_elsewhere = [
        "id",
        "run_id",
        "test_id",
        "organization_id",
        "project_id",
        "location",
        "started_at",
        "completed_at",
        "k6_version",
        "summary_json",
        "summary_s3_url",
        "config_snapshot",
        "created_at",
    ];
    for c in &columns {
        assert!(
            keys.contains(&c) || from_elsewhere.contains(&c.as_str()),
            "column {c} is not extracted"
        );
    }
}

/// k6 allows any character in check and group names; PostgreSQL text cannot hold NUL.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_nul_in_a_check_name_is_stored_replaced_with_a_warning(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "groups-nested-checks");
    let path = dir.path().join("summary.json");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("\"status is 200\"", "\"status\\u0000is 200\"");
    std::fs::write(&path, text).unwrap();
    let msg = ingest_dir(ing, dir.path()).await;
    let names: Vec<String> =
        sqlx::query_scalar("SELECT name FROM k6_check_results WHERE name LIKE 'status%is 200'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(names.len(), 3);
    assert!(
        names.iter().all(|n| n == "status\u{FFFD}is 200"),
        "{names:?}"
    );
    let warnings: serde_json::Value = value_of(
        &pool,
        "SELECT warnings FROM k6_performance_runs WHERE run_id = $1",
        msg.run_id,
    )
    .await;
    assert!(warnings.to_string().contains("NUL"), "{warnings}");
}
