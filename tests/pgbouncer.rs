//! The worker behind PgBouncer 1.18 (Debian 12) in transaction pooling mode, started by
//! `scripts/services-up.sh` on `K6_TEST_PGBOUNCER_URL`, with
//! `database.prepared_statements = false` (SPEC section 13): every fixture, a
//! concurrent burst, redeliveries and the consumer, through the pooler. The `*` entry
//! of its config reaches each test's own database by name.

mod harness;

use harness::*;
use k6_ingest::db::Db;
use k6_ingest::ingest::{IngestError, Ingestor, Outcome};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

fn pgbouncer_url() -> String {
    let base = std::env::var("K6_TEST_PGBOUNCER_URL")
        .expect("K6_TEST_PGBOUNCER_URL not set: run `eval \"$(scripts/services-up.sh)\"` first");
    base.trim_end_matches('/').to_string()
}

/// A pool on the test's database through PgBouncer.
fn through_pgbouncer(pool: &PgPool, max_connections: u32) -> PgPool {
    let db = pool.connect_options().get_database().unwrap().to_string();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .connect_lazy(&format!("{}/{db}", pgbouncer_url()))
        .unwrap()
}

/// Closes PgBouncer's server sessions on the test's database (admin console
/// `RECONNECT`), so `#[sqlx::test]` can drop the database when the test ends.
async fn release_server_sessions(pool: &PgPool) {
    use sqlx::{Connection, Row};
    let db = pool.connect_options().get_database().unwrap().to_string();
    let mut admin = sqlx::PgConnection::connect(&format!("{}/pgbouncer", pgbouncer_url()))
        .await
        .unwrap();
    sqlx::raw_sql(&format!("RECONNECT {db}"))
        .execute(&mut admin)
        .await
        .unwrap();
    let admin = tokio::sync::Mutex::new(admin);
    wait_for("PgBouncer's server sessions closed", || async {
        // The admin console speaks the simple protocol only.
        let servers = sqlx::raw_sql("SHOW SERVERS")
            .fetch_all(&mut *admin.lock().await)
            .await
            .unwrap();
        let open = servers
            .iter()
            .filter(|r| r.try_get::<String, _>("database").is_ok_and(|d| d == db))
            .count();
        (open == 0).then_some(())
    })
    .await;
}

async fn bouncer_ingestor(pool: &PgPool, s: &k6_ingest::config::Settings) -> Ingestor {
    ingestor(&through_pgbouncer(pool, 16), s)
        .await
        .with_prepared_statements(false)
}

/// What a run stored, without ids and times: equal for two ingests of one fixture.
async fn run_digest(pool: &PgPool, run_id: Uuid) -> String {
    value_of(pool, "SELECT row_to_json(x)::text FROM (SELECT r.status AS run_status, r.error_details, \
             p.status, p.summary_format, p.p95_response_time_ms, p.request_rate, p.checks_total, \
             p.thresholds_total, p.thresholds_failed, p.warnings, p.value_sources, \
             (SELECT md5(string_agg(m.metric_name || ' ' || m.raw_values::text || ' ' || m.percentiles::text \
                 || ' ' || coalesce(m.value, 0) || ' ' || coalesce(m.p95_value, 0), '|' ORDER BY m.metric_name)) \
              FROM k6_metrics_history m WHERE m.k6_run_id = p.id) AS metrics, \
             (SELECT md5(string_agg(t.metric_name || ' ' || t.expression || ' ' || t.ok, '|' \
                 ORDER BY t.metric_name, t.expression)) \
              FROM k6_threshold_results t WHERE t.k6_run_id = p.id) AS thresholds, \
             (SELECT md5(string_agg(c.position || ' ' || c.path || ' ' || coalesce(c.passes, -1), '|' \
                 ORDER BY c.position)) \
              FROM k6_check_results c WHERE c.k6_run_id = p.id) AS checks \
         FROM runs r JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = $1) x", run_id).await
}

/// Every bundled fixture through PgBouncer stores exactly what a direct connection
/// stores; redeliveries are recognised; then 16 runs at once (connections switching
/// server sessions between transactions) are each stored once.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn every_fixture_and_a_concurrent_burst_are_stored_through_pgbouncer(pool: PgPool) {
    let s = settings();
    let direct = ingestor(&pool, &s).await;
    let bounced = bouncer_ingestor(&pool, &s).await;
    let runs = all_fixture_runs();
    assert!(runs.len() >= 30, "{} fixture runs", runs.len());
    for (version, case) in &runs {
        let dir = fixture_dir(version, case);
        let ctx = ctx(&dir);
        let a = message(&dir);
        let b = with_fresh_ids(&a);
        let first = direct.ingest_one(&a, &ctx).await;
        let second = bounced.ingest_one(&b, &ctx).await;
        // The same outcome (a run without its summary is an error both ways)...
        assert_eq!(
            first
                .as_ref()
                .map(|r| r.outcome)
                .map_err(IngestError::class),
            second
                .as_ref()
                .map(|r| r.outcome)
                .map_err(IngestError::class),
            "{version}/{case}"
        );
        // ...and the same rows.
        assert_eq!(
            run_digest(&pool, a.run_id).await,
            run_digest(&pool, b.run_id).await,
            "{version}/{case}"
        );
        if second.is_ok() {
            let again = bounced.ingest_one(&b, &ctx).await.unwrap();
            assert_eq!(again.outcome, Outcome::AlreadyPresent, "{version}/{case}");
            assert_eq!(again.line, second.unwrap().line, "{version}/{case}");
        }
    }

    // A burst: 16 new runs at once, and each of them a second time concurrently.
    let mut tasks = tokio::task::JoinSet::new();
    let mut ids = Vec::new();
    for i in 0..16 {
        let (version, case) = &runs[i % runs.len()];
        let dir = fixture_dir(version, case);
        let msg = with_fresh_ids(&message(&dir));
        ids.push(msg.run_id);
        for _ in 0..2 {
            let (ing, msg, dir) = (bounced.clone(), msg.clone(), dir.clone());
            tasks.spawn(async move {
                let r = ing.ingest_one(&msg, &ctx(&dir)).await;
                (
                    msg.run_id,
                    r.map(|r| r.outcome)
                        .map_err(|e| (e.class().as_str(), e.to_string())),
                )
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        let (run_id, outcome) = done.unwrap();
        match outcome {
            Ok(_) | Err(("summary_unusable", _)) => {}
            Err(e) => panic!("run {run_id}: {e:?}"),
        }
    }
    let per_run: Vec<(Uuid, i64, i64)> = sqlx::query_as(
        "SELECT r.id, (SELECT count(*) FROM runs WHERE id = r.id), \
                (SELECT count(*) FROM k6_performance_runs WHERE run_id = r.id) \
         FROM unnest($1::uuid[]) AS r(id)",
    )
    .bind(&ids)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(per_run.len(), 16);
    for (id, runs, perf) in per_run {
        assert_eq!((runs, perf), (1, 1), "run {id}");
    }
    drop((direct, bounced));
    release_server_sessions(&pool).await;
}

/// Why the setting exists: with sqlx's named prepared statements, two clients of
/// PgBouncer 1.18 in transaction mode meet on one server session and collide. Without
/// them the same sequence works.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn named_prepared_statements_break_behind_pgbouncer_1_18(pool: PgPool) {
    let run_id = Uuid::now_v7();
    // Two clients, one connection each, taking turns with different statements:
    // PgBouncer hands each transaction whichever server session is free, so a client
    // meets statements another client prepared under the same name (`sqlx_s_1`...),
    // or misses the ones it prepared itself.
    let (a, b) = (through_pgbouncer(&pool, 1), through_pgbouncer(&pool, 1));
    let (a, b) = (Db::new(a, true), Db::new(b, true));
    let mut errors = Vec::new();
    for _ in 0..10 {
        for r in [
            a.stored_line(run_id).await.map(drop),
            b.existing(run_id).await.map(drop),
            a.existing(run_id).await.map(drop),
            b.referenced_s3_uris(run_id).await.map(drop),
            b.stored_line(run_id).await.map(drop),
        ] {
            if let Err(e) = r {
                errors.push(e.to_string());
            }
        }
    }
    assert!(
        errors.iter().any(|e| e.contains("prepared statement")),
        "expected prepared-statement collisions, got: {errors:?}"
    );

    let (a, b) = (through_pgbouncer(&pool, 1), through_pgbouncer(&pool, 1));
    let (a, b) = (Db::new(a, false), Db::new(b, false));
    for _ in 0..10 {
        a.stored_line(run_id).await.unwrap();
        b.existing(run_id).await.unwrap();
        a.existing(run_id).await.unwrap();
        b.referenced_s3_uris(run_id).await.unwrap();
        b.stored_line(run_id).await.unwrap();
        a.probe().await.unwrap();
    }
    release_server_sessions(&pool).await;
}

/// The consumer through PgBouncer: readiness (its database probe), ingestion and
/// duplicates, with `database.prepared_statements = false`.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn the_consumer_works_through_pgbouncer(pool: PgPool) {
    let mut s = queue_settings(&tag());
    s.database.prepared_statements = false;
    let ing = ingestor(&through_pgbouncer(&pool, 8), &s)
        .await
        .with_prepared_statements(s.database.prepared_statements);
    let worker = Consumer::start(&s, ing).await;
    wait_readyz(worker.addr(), 200).await;

    let msgs = messages(12);
    let mut all = bodies(&msgs);
    all.extend(bodies(&msgs[..4]));
    publish_bodies(&s, &all).await;
    wait_stored(&pool, &msgs, "all runs stored").await;
    worker.wait_settled(16).await;
    assert_each_stored_once(&pool, &msgs).await;
    let m = worker.running.metrics.snapshot();
    assert_eq!((m.ingested, m.duplicates), (12, 4));
    let conn = connect().await;
    let topo = k6_ingest::amqp::Topology::new(&s.amqp);
    assert_eq!(queue_len(&conn, &topo.dead_letter_queue).await, 0);

    worker.stop().await;
    release_server_sessions(&pool).await;
}

/// The real binary, configured from the environment as in a deployment: `replay` of
/// every fixture through PgBouncer fails on prepared-statement collisions with
/// `K6_INGEST__DATABASE__PREPARED_STATEMENTS=true` and stores every run with `false`.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn replay_through_pgbouncer_follows_the_environment_setting(pool: PgPool) {
    let s = settings();
    store(&s).await; // the bucket
    let db = pool.connect_options().get_database().unwrap().to_string();
    let url = format!("{}/{db}", pgbouncer_url());
    let replay = |prepared: &str| {
        let out = command(&["replay", fixtures().to_str().unwrap()], &url, &s)
            .env("K6_INGEST__DATABASE__PREPARED_STATEMENTS", prepared)
            .env("K6_INGEST__INGEST__CONCURRENCY", "8")
            .output()
            .unwrap();
        all_output(&out)
    };
    let with_prepared = replay("true");
    assert!(
        with_prepared.contains("prepared statement"),
        "expected prepared-statement errors:\n{with_prepared}"
    );
    let without = replay("false");
    assert!(!without.contains("prepared statement"), "{without}");

    let ids: Vec<Uuid> = all_fixture_runs()
        .iter()
        .map(|(v, c)| message(&fixture_dir(v, c)).run_id)
        .collect();
    assert_eq!(
        run_rows(&pool, &ids).await,
        (ids.len() as i64, ids.len() as i64),
        "{without}"
    );
    release_server_sessions(&pool).await;
}
