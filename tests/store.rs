//! What the database is sent, and what happens when it refuses it: keys of any length,
//! duplicates merged, NUL replaced, a refused run recorded as `error`, and no S3 object
//! left behind that no row refers to. Real PostgreSQL and S3 throughout; refusals are
//! forced with triggers installed in the test's own database (real refusals, raised by
//! PostgreSQL, for content the schema itself now accepts).

mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use harness::*;
use k6_ingest::db::Db;
use k6_ingest::ingest::{Disposition, IngestError, Outcome};
use k6_ingest::message::RunCompleted;
use serde_json::{Value, json};
use sqlx::{PgPool, Row};
use uuid::Uuid;

fn decode(v: &Value) -> RunCompleted {
    RunCompleted::decode(v.to_string().as_bytes()).unwrap()
}

/// k6 does not bound metric names, selectors or threshold expressions; the btree limit
/// (about 2.7 KB) used to fail the whole run on a 10,000-character key.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn metric_and_threshold_keys_of_any_length_are_stored(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    let path = dir.path().join("summary.json");
    let mut summary = read_json(&path);
    let long_name = format!("my_trend{{label:{}}}", "x".repeat(10_000));
    let long_expr = format!("p(95)<{}", "9".repeat(10_000));
    let metrics = summary["metrics"].as_object_mut().unwrap();
    let mut trend = metrics["http_req_duration"].clone();
    trend["thresholds"] = json!({ long_expr.clone(): {"ok": true} });
    metrics.insert(long_name.clone(), trend);
    // Names a text-to-bytea cast would confuse (`\x41` reads as 'A'): two rows.
    let counter = metrics["http_reqs"].clone();
    metrics.insert("A".into(), counter.clone());
    metrics.insert(r"\x41".into(), counter);
    write_json(&path, &summary);

    let msg = ingest_dir(ing, dir.path()).await;
    let stored: Vec<String> = values_of(&pool, "SELECT m.metric_name FROM k6_metrics_history m JOIN k6_performance_runs p ON p.id = m.k6_run_id \
         WHERE p.run_id = $1 AND (length(m.metric_name) > 10000 OR m.metric_name IN ('A', '\\x41')) \
         ORDER BY 1", msg.run_id).await;
    assert_eq!(
        stored,
        vec!["A".to_string(), r"\x41".into(), long_name.clone()]
    );
    let (metric, expr): (String, String) = row_of(&pool, "SELECT t.metric_name, t.expression FROM k6_threshold_results t \
         JOIN k6_performance_runs p ON p.id = t.k6_run_id WHERE p.run_id = $1 AND length(t.expression) > 10000", msg.run_id).await;
    assert_eq!((metric, expr), (long_name, long_expr));
}

/// The machine-readable summary lists metrics in arrays: a metric listed twice (or
/// twice once NUL characters are replaced) is kept once, the last occurrence, with a
/// warning on the run.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_metric_listed_twice_keeps_its_last_occurrence_with_a_warning(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    // k6 1.5's schema 1.0.0 (the same document tests/extract.rs reads), with
    // http_req_duration repeated, and a counter repeated under a NUL-bearing name.
    let doc = json!({
        "version": "1.0.0",
        "config": {"duration": 2.5, "execution": "local", "script": "s.js"},
        "metadata": {"generatedAt": "2026-11-22T00:00:00Z", "k6Version": "1.5.0"},
        "results": {
            "checks": {"metrics": [], "results": [{"name": "ok", "passes": 9, "fails": 1}]},
            "metrics": [
                {"name": "http_reqs", "type": "counter", "contains": "default", "values": {"count": 50}},
                {"name": "http_req_duration", "type": "trend", "contains": "time",
                 "values": {"avg": 10, "min": 1, "med": 9, "max": 40, "p(90)": 20, "p(95)": 30.5}},
                {"name": "my\u{FFFD}count", "type": "counter", "contains": "default", "values": {"count": 1}},
                {"name": "http_req_failed", "type": "rate", "contains": "default",
                 "values": {"rate": 0.1, "matches": 5, "total": 50}},
                {"name": "http_req_duration", "type": "trend", "contains": "time",
                 "values": {"avg": 11, "min": 2, "med": 10, "max": 45, "p(90)": 21, "p(95)": 41.5}},
                {"name": "my\u{0}count", "type": "counter", "contains": "default", "values": {"count": 2}}
            ]
        }
    });
    write_json(&dir.path().join("summary.json"), &doc);
    let msg = ingest_dir(ing, dir.path()).await;

    let rows = sqlx::query(
        "SELECT m.metric_name, m.p95_value, (m.raw_values->>'count')::float8 FROM k6_metrics_history m \
         JOIN k6_performance_runs p ON p.id = m.k6_run_id WHERE p.run_id = $1 \
         AND m.metric_name IN ('http_req_duration', 'my\u{FFFD}count') ORDER BY 1",
    )
    .bind(msg.run_id)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "one row each");
    assert_eq!(rows[0].get::<String, _>(0), "http_req_duration");
    assert_eq!(
        rows[0].get::<Option<i64>, _>(1),
        Some(41_500),
        "the last occurrence"
    );
    assert_eq!(rows[1].get::<String, _>(0), "my\u{FFFD}count");
    assert_eq!(
        rows[1].get::<Option<f64>, _>(2),
        Some(2.0),
        "the last occurrence"
    );
    let p95: Option<i64> = value_of(
        &pool,
        "SELECT p95_response_time_ms FROM k6_performance_runs WHERE run_id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(p95, Some(42), "the run's columns use the kept occurrence");
    let warnings = perf_warnings(&pool, msg.run_id).await;
    assert!(
        warnings.contains(
            "http_req_duration: metric listed more than once; the last occurrence is kept"
        ),
        "{warnings}"
    );
    assert!(
        warnings.contains("my\u{FFFD}count: metric listed more than once"),
        "{warnings}"
    );
}

/// In handleSummary's objects a key written twice already keeps its last value (JSON
/// parsing); keys that become equal once NUL is replaced do the same, with a warning,
/// for metrics and for a metric's thresholds.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn keys_equal_after_nul_replacement_keep_the_last_with_a_warning(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    let path = dir.path().join("summary.json");
    let mut summary = read_json(&path);
    let metrics = summary["metrics"].as_object_mut().unwrap();
    let mut first = metrics["http_reqs"].clone();
    first["values"]["count"] = json!(1);
    first["thresholds"] = json!({"count>\u{FFFD}0": {"ok": true}});
    let mut last = metrics["http_reqs"].clone();
    last["values"]["count"] = json!(2);
    last["thresholds"] = json!({"count>\u{FFFD}0": {"ok": true}, "count>\u{0}0": {"ok": false}});
    metrics.insert("reqs\u{FFFD}copy".into(), first);
    metrics.insert("reqs\u{0}copy".into(), last);
    write_json(&path, &summary);
    let msg = ingest_dir(ing, dir.path()).await;

    let counts: Vec<Option<f64>> = values_of(&pool, "SELECT (m.raw_values->>'count')::float8 FROM k6_metrics_history m JOIN k6_performance_runs p ON p.id = m.k6_run_id \
         WHERE p.run_id = $1 AND m.metric_name = 'reqs\u{FFFD}copy'", msg.run_id).await;
    assert_eq!(counts, vec![Some(2.0)], "one row, the last value");
    let oks: Vec<bool> = values_of(
        &pool,
        "SELECT t.ok FROM k6_threshold_results t JOIN k6_performance_runs p ON p.id = t.k6_run_id \
         WHERE p.run_id = $1 AND t.metric_name = 'reqs\u{FFFD}copy'",
        msg.run_id,
    )
    .await;
    assert_eq!(oks, vec![false], "one threshold row, the last occurrence");
    let warnings = perf_warnings(&pool, msg.run_id).await;
    assert!(
        warnings.contains("appears twice once NUL characters are replaced"),
        "{warnings}"
    );
}

/// PostgreSQL text and jsonb cannot hold NUL: in the message's strings (and keys deep in
/// metadata and config_snapshot) it is replaced by U+FFFD, with a warning on the run.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn nul_in_message_strings_is_replaced_with_a_warning(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let dir = fixture_dir("v1.1.0", "thresholds-pass");
    let mut m = fresh_message_json(&dir);
    m["location"] = json!("us\u{0}east");
    m["k6_version"] = json!("1.1.0\u{0}");
    m["metadata"] = json!({"team\u{0}": {"note": "a\u{0}b", "list": ["\u{0}"]}});
    m["config_snapshot"] = json!({"opt\u{0}": 1});
    let msg = decode(&m);
    let report = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Ingested);
    let row = sqlx::query(
        "SELECT r.location, p.k6_version, r.metadata, p.config_snapshot, p.warnings \
         FROM runs r JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = $1",
    )
    .bind(msg.run_id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(row.get::<String, _>(0), "us\u{FFFD}east");
    assert_eq!(row.get::<String, _>(1), "1.1.0\u{FFFD}");
    let metadata: Value = row.get(2);
    assert_eq!(
        metadata["team\u{FFFD}"],
        json!({"note": "a\u{FFFD}b", "list": ["\u{FFFD}"]})
    );
    let config: Value = row.get(3);
    assert_eq!(config, json!({"opt\u{FFFD}": 1}));
    let warnings: Value = row.get(4);
    assert!(
        warnings
            .to_string()
            .contains("message: 6 NUL character(s) replaced by U+FFFD"),
        "{warnings}"
    );
}

/// A trigger that refuses, with `code`, any metric row named `refuse_me`: a real
/// PostgreSQL refusal of content the schema itself accepts.
async fn refuse_marker_metric(pool: &PgPool, code: &str) {
    sqlx::raw_sql(&format!(
        "CREATE OR REPLACE FUNCTION refuse_marker() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.metric_name = 'refuse_me' THEN \
           RAISE EXCEPTION 'refused by the test (%)', '{code}' USING ERRCODE = '{code}'; \
         END IF; RETURN NEW; END $$; \
         DROP TRIGGER IF EXISTS refuse_marker ON k6_metrics_history; \
         CREATE TRIGGER refuse_marker BEFORE INSERT ON k6_metrics_history \
           FOR EACH ROW EXECUTE FUNCTION refuse_marker();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

/// A fixture copy whose summary has a metric named `refuse_me`.
fn with_marker_metric() -> tempfile::TempDir {
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    let path = dir.path().join("summary.json");
    let mut summary = read_json(&path);
    let metrics = summary["metrics"].as_object_mut().unwrap();
    let counter = metrics["http_reqs"].clone();
    metrics.insert("refuse_me".into(), counter);
    write_json(&path, &summary);
    dir
}

/// Each kind of permanent refusal (value too long, check violation, out of range,
/// index row too large, unique violation, bad text) ends as an `error` record with the
/// reason and no detail rows, its artifacts kept in S3 and referenced, and a
/// dead-letter disposition. Replayed after the fix, the run replaces its error record.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_refused_run_is_recorded_as_error_with_the_reason(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let store = &env.store;
    let dir = with_marker_metric();
    let mut last = None;
    for code in ["22001", "23514", "22003", "54000", "23505", "22P02"] {
        refuse_marker_metric(&pool, code).await;
        let msg = decode(&fresh_message_json(dir.path()));
        let err = ing.ingest_one(&msg, &ctx(dir.path())).await.unwrap_err();
        assert!(
            matches!(&err, IngestError::ContentRefused { run_id, .. } if *run_id == msg.run_id),
            "{code}: {err}"
        );
        assert_eq!(err.disposition(), Disposition::DeadLetter, "{code}");
        assert_eq!(err.class(), "content_refused", "{code}");
        assert!(err.to_string().contains(code), "{code}: {err}");

        let row = sqlx::query(
            "SELECT r.status, r.error_details, p.status, p.summary_format, r.artifact_paths, \
                    r.logs_s3_url, p.warnings, p.organization_id \
             FROM runs r JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = $1",
        )
        .bind(msg.run_id)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(row.get::<String, _>(0), "error", "{code}");
        let details: String = row.get(1);
        assert!(
            details.contains("k6_metrics_history")
                && details.contains(code)
                && details.contains("refused by the test"),
            "{code}: {details}"
        );
        assert_eq!(row.get::<String, _>(2), "error");
        assert_eq!(row.get::<Option<String>, _>(3), None, "no summary content");
        assert_eq!(row.get::<Uuid, _>(7), msg.organization_id);
        assert!(row.get::<Value, _>(6).to_string().contains(code));
        assert_eq!(
            detail_rows(&pool, msg.run_id).await,
            0,
            "{code}: no detail rows"
        );

        // The uploads stay, referenced by the record, where a person can read them.
        let paths: Value = row.get(4);
        let logs_uri = paths["logs"]["s3"].as_str().unwrap().to_string();
        assert_eq!(
            row.get::<Option<String>, _>(5).as_deref(),
            Some(logs_uri.as_str())
        );
        let objects = objects_of_run(store, &msg).await;
        assert!(
            objects.iter().any(|k| logs_uri.ends_with(k.as_str())),
            "{code}: {objects:?}"
        );
        let logs_key = store.key_of(&logs_uri).unwrap().to_string();
        assert_eq!(
            get_object(store, &logs_key).await,
            std::fs::read(dir.path().join("k6.log")).unwrap()
        );
        last = Some(msg);
    }

    // A fault that is not about the content (here an internal error) records nothing
    // against the run: it is the plain database error it always was. Its uploads stay
    // (a concurrent attempt may be about to commit rows referring to the same keys; a
    // replay uploads them again and refers to them).
    refuse_marker_metric(&pool, "XX000").await;
    let msg = decode(&fresh_message_json(dir.path()));
    let err = ing.ingest_one(&msg, &ctx(dir.path())).await.unwrap_err();
    assert_eq!(err.class(), "database", "{err}");
    let runs: i64 = value_of(&pool, "SELECT count(*) FROM runs WHERE id = $1", msg.run_id).await;
    assert_eq!(runs, 0);
    let kept = objects_of_run(store, &msg).await;
    assert!(kept.iter().any(|k| k.ends_with("/k6.log")), "{kept:?}");

    // The cause fixed, the dead-lettered message replayed: the error record is replaced.
    sqlx::raw_sql("DROP TRIGGER refuse_marker ON k6_metrics_history")
        .execute(&pool)
        .await
        .unwrap();
    let msg = last.unwrap();
    let report = ing.ingest_one(&msg, &ctx(dir.path())).await.unwrap();
    assert_eq!(report.outcome, Outcome::Replaced);
    let (status, details): (String, Option<String>) = run_status(&pool, msg.run_id).await;
    assert_eq!((status.as_str(), details), ("passed", None));
    assert!(detail_rows(&pool, msg.run_id).await > 0);
}

/// When even the `error` record is refused, the refusal is returned (the message is
/// dead-lettered with it), nothing is stored, and the uploads no row refers to are
/// deleted from S3.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn when_even_the_error_record_is_refused_nothing_is_left_behind(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    let store = &env.store;
    let dir = copy_fixture("v1.1.0", "thresholds-pass");
    let msg = decode(&fresh_message_json(dir.path()));
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_run() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.run_id = '{}' THEN \
           RAISE EXCEPTION 'no row for this run' USING ERRCODE = '23514'; \
         END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_run BEFORE INSERT ON k6_performance_runs \
           FOR EACH ROW EXECUTE FUNCTION refuse_run();",
        msg.run_id
    ))
    .execute(&pool)
    .await
    .unwrap();

    let err = ing.ingest_one(&msg, &ctx(dir.path())).await.unwrap_err();
    assert!(matches!(err, IngestError::Store { .. }), "{err}");
    assert_eq!(err.disposition(), Disposition::DeadLetter);
    assert_eq!(err.class(), "content_refused");
    assert!(err.to_string().contains("no row for this run"), "{err}");
    let runs: i64 = value_of(&pool, "SELECT count(*) FROM runs WHERE id = $1", msg.run_id).await;
    assert_eq!(runs, 0);
    assert_eq!(objects_of_run(store, &msg).await, Vec::<String>::new());

    // The same path stores a run the trigger does not refuse, and its objects stay:
    // the listing above can see objects.
    let other = decode(&fresh_message_json(dir.path()));
    ing.ingest_one(&other, &ctx(dir.path())).await.unwrap();
    assert!(objects_of_run(store, &other).await.len() >= 2);
}

/// Serves the run's log over HTTP; serving it first creates the run's `runs` row for
/// another organization: the tenant changes between the worker's pre-check and its
/// store transaction, after the other artifacts were fetched, before they are uploaded.
async fn serve_log_and_steal_the_run(
    pool: PgPool,
    log: Vec<u8>,
    victim: RunCompleted,
    hits: Arc<AtomicUsize>,
) -> String {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/k6.log",
        get(move || {
            let (pool, log, victim, hits) =
                (pool.clone(), log.clone(), victim.clone(), hits.clone());
            async move {
                if hits.fetch_add(1, Ordering::SeqCst) == 0 {
                    sqlx::query(
                        "INSERT INTO runs (id, organization_id, project_id, status) \
                         VALUES ($1, $2, $3, 'running')",
                    )
                    .bind(victim.run_id)
                    .bind(Uuid::now_v7())
                    .bind(victim.project_id)
                    .execute(&pool)
                    .await
                    .unwrap();
                }
                log
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr.to_string()
}

#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_tenant_mismatch_found_in_the_store_leaves_no_objects_in_s3(pool: PgPool) {
    let dir = fixture_dir("v1.1.0", "thresholds-pass");
    let msg = decode(&fresh_message_json(&dir));
    let hits = Arc::new(AtomicUsize::new(0));
    let log = std::fs::read(dir.join("k6.log")).unwrap();
    let host = serve_log_and_steal_the_run(pool.clone(), log, msg.clone(), hits.clone()).await;
    let mut s = settings();
    s.fetch.allowed_hosts.push(host.clone());
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let store = &env.store;
    let mut msg = msg;
    msg.artifacts.logs = Some(format!("http://{host}/k6.log"));
    assert!(
        msg.artifacts.metrics.is_some(),
        "two objects go up: logs and metrics"
    );

    let err = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap_err();
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the log was fetched once");
    assert_eq!(err.class(), "tenant_mismatch", "{err}");
    assert_eq!(err.disposition(), Disposition::DeadLetter);
    assert_eq!(objects_of_run(store, &msg).await, Vec::<String>::new());
    let n: i64 = value_of(
        &pool,
        "SELECT count(*) FROM k6_performance_runs WHERE run_id = $1",
        msg.run_id,
    )
    .await;
    assert_eq!(n, 0);

    // Without the race the same message's uploads stay (the listing can see them).
    let mut fine = decode(&fresh_message_json(&dir));
    fine.artifacts.logs = msg.artifacts.logs.clone();
    ing.ingest_one(&fine, &ctx(&dir)).await.unwrap();
    let kept = objects_of_run(store, &fine).await;
    assert!(
        kept.iter().any(|k| k.ends_with("k6.log")) && kept.len() >= 2,
        "{kept:?}"
    );
}

/// Through the consumer: a refused run is dead-lettered once (never retried), with the
/// class `content_refused` and the reason, and its `error` record is stored.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn the_consumer_dead_letters_a_refused_run_after_recording_it(pool: PgPool) {
    use k6_ingest::amqp::{self, ATTEMPTS_HEADER, REASON_CLASS_HEADER, REASON_HEADER, Topology};

    let env = TestEnv::queued(&pool).await;

    let s = &env.s;
    let refused = case_message("thresholds-pass");
    let good = case_message("thresholds-fail");
    let refused_id = run_id_of(&refused);
    // Refuses the metric rows of that one run, as PostgreSQL would an oversized value.
    sqlx::raw_sql(&format!(
        "CREATE FUNCTION refuse_run_metrics() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF EXISTS (SELECT 1 FROM k6_performance_runs p \
                          WHERE p.id = NEW.k6_run_id AND p.run_id = '{refused_id}') THEN \
           RAISE EXCEPTION 'value too long for the test' USING ERRCODE = '22001'; \
         END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_run_metrics BEFORE INSERT ON k6_metrics_history \
           FOR EACH ROW EXECUTE FUNCTION refuse_run_metrics();"
    ))
    .execute(&pool)
    .await
    .unwrap();
    declare(s).await;
    publish_bodies(s, &bodies(&[refused.clone(), good.clone()])).await;
    let worker = Consumer::start(s, env.ing).await;
    let conn = connect().await;
    let topo = Topology::new(&s.amqp);
    wait_queue_len(&conn, &topo.dead_letter_queue, 1, "one dead letter").await;
    wait_stored_count(
        &pool,
        &run_ids(std::slice::from_ref(&good)),
        1,
        "the good run",
    )
    .await;
    let dead = drain(&conn, &topo.dead_letter_queue).await;
    let (body, props) = &dead[0];
    assert_eq!(body, &serde_json::to_vec(&refused).unwrap());
    assert_eq!(
        amqp::header_str(props, REASON_CLASS_HEADER).as_deref(),
        Some("content_refused")
    );
    let reason = amqp::header_str(props, REASON_HEADER).unwrap_or_default();
    assert!(
        reason.contains("value too long for the test") && reason.contains("k6_metrics_history"),
        "{reason}"
    );
    assert_eq!(
        amqp::header_u64(props, ATTEMPTS_HEADER),
        Some(1),
        "never retried"
    );
    assert_eq!(
        worker
            .running
            .metrics
            .dead_lettered_count("content_refused"),
        1
    );
    let (status, details): (String, String) = run_status(&pool, refused_id).await;
    assert_eq!(status, "error");
    assert!(details.contains("value too long for the test"), "{details}");
    assert_eq!(detail_rows(&pool, refused_id).await, 0);

    worker.stop().await;
}

/// Serves the same bytes under any path.
async fn serve_any_path(body: Vec<u8>) -> String {
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        async move { body }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr.to_string()
}

/// An upload refused for good after another one succeeded: the message is
/// dead-lettered, and the object already uploaded is not left without a row. The
/// refusal is the S3 server's own (`KeyTooLongError`: keys are limited to 1024 bytes).
/// A transient failure deletes nothing (it is retried under the same keys, and a
/// concurrent duplicate may be about to commit rows referring to them).
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_permanently_failed_upload_leaves_none_of_the_runs_objects(pool: PgPool) {
    let dir = fixture_dir("v1.1.0", "thresholds-pass");
    let host = serve_any_path(std::fs::read(dir.join("metrics.ndjson.gz")).unwrap()).await;
    let mut s = settings();
    s.fetch.allowed_hosts.push(host.clone());
    let env = TestEnv::with_settings(&pool, s).await;
    let ing = &env.ing;
    let store = &env.store;
    let runs_of = |id: Uuid| {
        let pool = pool.clone();
        async move { value_of::<i64, _>(&pool, "SELECT count(*) FROM runs WHERE id = $1", id).await }
    };

    // Logs first (from the fixture), then the metrics under a 1,100-byte name.
    let mut m = fresh_message_json(&dir);
    m["artifacts"]["metrics"] = json!(format!("http://{host}/{}.ndjson.gz", "m".repeat(1100)));
    let msg = decode(&m);
    let err = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap_err();
    assert!(
        matches!(&err, IngestError::Upload { source, .. } if !source.fault().is_retryable()
            && source.message.contains("KeyTooLong")),
        "{err}"
    );
    assert_eq!(err.disposition(), Disposition::DeadLetter);
    assert_eq!(objects_of_run(store, &msg).await, Vec::<String>::new());
    assert_eq!(runs_of(msg.run_id).await, 0);

    // A transient failure (s3s-fs answers InternalError for a key its file system
    // cannot hold) keeps what went up: the logs stay for the retry to overwrite.
    let mut m = fresh_message_json(&dir);
    m["artifacts"]["metrics"] = json!(format!("http://{host}/{}.ndjson.gz", "m".repeat(240)));
    let msg = decode(&m);
    let err = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap_err();
    assert_eq!(err.disposition(), Disposition::Retry, "{err}");
    let kept = objects_of_run(store, &msg).await;
    assert!(kept.iter().any(|k| k.ends_with("/k6.log")), "{kept:?}");
    assert_eq!(runs_of(msg.run_id).await, 0);
}

/// The lookups of runs in flight go to PostgreSQL together, one statement for those that
/// wait: each run still gets its own answer, whatever else shares the statement; and a
/// lookup that cannot be made is an error, never "nothing stored".
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn gathered_lookups_each_answer_their_own_run(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let full = ingest_dir(&env.ing, copy_fixture("v1.1.0", "thresholds-pass").path()).await;
    let dir = copy_fixture("v1.1.0", "thresholds-fail");
    let path = dir.path().join("message.json");
    let mut m = read_json(&path);
    m["artifacts"].as_object_mut().unwrap().remove("summary");
    write_json(&path, &m);
    let bare = message(dir.path());
    // Stored as `error`, with no summary.
    let stored = env.ing.ingest_one(&bare, &ctx(dir.path())).await;
    assert!(
        matches!(stored, Err(IngestError::SummaryUnusable { .. })),
        "{stored:?}"
    );

    let db = Db::new(pool.clone(), true);
    // Unknown runs around the two stored ones, all asked at once.
    let mut ids: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
    ids.insert(7, full.run_id);
    ids.insert(30, bare.run_id);
    let answers = futures_util::future::join_all(ids.iter().map(|id| db.existing(*id))).await;
    for (id, found) in ids.iter().zip(answers) {
        let found = found.unwrap();
        let expected = if *id == full.run_id {
            (Some((full.organization_id, full.project_id)), Some(true))
        } else if *id == bare.run_id {
            (Some((bare.organization_id, bare.project_id)), Some(false))
        } else {
            (None, None)
        };
        assert_eq!(
            (found.tenant, found.performance_has_summary),
            expected,
            "{id}"
        );
    }

    pool.close().await;
    let failed =
        futures_util::future::join_all([db.existing(full.run_id), db.existing(Uuid::new_v4())])
            .await;
    for r in failed {
        assert!(matches!(r, Err(sqlx::Error::PoolClosed)), "{r:?}");
    }
}

/// A session reading the k6 tables in a long transaction (a dashboard's report, a
/// backup) when a run of a month without partitions arrives: making the month gives up
/// after its lock timeout instead of waiting for the reader, with every other user of
/// the tables queued behind it; the run fails with a fault that is retried, a run of a
/// month that has its partitions is stored meanwhile, and once the reader is done the
/// first run is stored in its own month.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn a_long_reader_delays_a_new_month_without_stopping_the_other_runs(pool: PgPool) {
    use std::time::{Duration, Instant};
    let env = TestEnv::new(&pool).await;
    let reader = reading_k6_tables(&pool).await;

    let old_dir = copy_fixture("v1.1.0", "thresholds-pass");
    let mut old = message(old_dir.path());
    let start: chrono::DateTime<chrono::Utc> = "2019-03-04T05:06:07Z".parse().unwrap();
    let took = old.completed_at.map(|c| c - old.started_at);
    old.started_at = start;
    old.completed_at = took.map(|d| start + d);
    let began = Instant::now();
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        env.ing.ingest_one(&old, &ctx(old_dir.path())),
    )
    .await
    .expect("the run gives up on the month's locks instead of waiting for the reader");
    let waited = began.elapsed();
    let err = refused.expect_err("no partitions for March 2019 while the reader holds the table");
    assert!(err.fault().is_retryable(), "{err}");
    assert!(err.to_string().contains("lock timeout"), "{err}");
    assert!(waited < Duration::from_secs(20), "{waited:?}");

    // This month has its partitions: its run is stored while the reader still reads.
    let now_dir = copy_fixture("v1.1.0", "thresholds-fail");
    let mut current = message(now_dir.path());
    let took = current.completed_at.map(|c| c - current.started_at);
    current.started_at = chrono::Utc::now();
    current.completed_at = took.map(|d| current.started_at + d);
    tokio::time::timeout(
        Duration::from_secs(30),
        env.ing.ingest_one(&current, &ctx(now_dir.path())),
    )
    .await
    .expect("a run of a month with partitions is not queued behind the reader")
    .unwrap();

    reader.commit().await.unwrap();
    env.ing
        .ingest_one(&old, &ctx(old_dir.path()))
        .await
        .unwrap();
    assert_eq!(started_year(&pool, old.run_id).await, 2019);
}
