//! History at scale against real PostgreSQL and the real S3-compatible server: the
//! partitioning migration on a filled database, archives that survive being killed,
//! restores row for row, and the dashboard's queries reading only the months they need.

mod harness;

use std::process::{Command, Output};

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use harness::*;
use k6_ingest::config::Settings;
use k6_ingest::db::Db;
use k6_ingest::history::{self, partition_name};
use k6_ingest::ingest::Outcome;
use k6_ingest::message::RunCompleted;
use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

const CASES: [&str; 3] = ["thresholds-fail", "groups-nested-checks", "custom-metrics"];

fn month(y: i32, m: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, 1).unwrap()
}

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

/// A fixture's message as a new run that started at `start`.
fn moved(case: &str, start: DateTime<Utc>) -> (RunCompleted, std::path::PathBuf) {
    let dir = fixture_dir("v1.1.0", case);
    let mut msg = message(&dir);
    let took = msg.completed_at.map(|c| c - msg.started_at);
    msg.run_id = Uuid::now_v7();
    msg.event_id = Uuid::now_v7();
    msg.started_at = start;
    msg.completed_at = took.map(|d| start + d);
    (msg, dir)
}

/// Ingests every case once per start time, through the real ingest; returns the messages.
async fn ingest_at(pool: &PgPool, s: &Settings, starts: &[DateTime<Utc>]) -> Vec<RunCompleted> {
    let ing = ingestor(pool, s).await;
    let mut out = Vec::new();
    for start in starts {
        for case in CASES {
            let (msg, dir) = moved(case, *start);
            let report = ing.ingest_one(&msg, &ctx(&dir)).await.unwrap();
            assert_eq!(report.outcome, Outcome::Ingested, "{case} at {start}");
            out.push(msg);
        }
    }
    out
}

/// Every row of `table` as JSON without the column `minus`, ordered.
async fn rows_json(pool: &PgPool, table: &str, minus: &str) -> Vec<String> {
    sqlx::query_scalar(&format!(
        "SELECT (to_jsonb(t) - $1::text)::text FROM {table} t ORDER BY 1"
    ))
    .bind(minus)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn partitions_of(pool: &PgPool, table: &str) -> Vec<String> {
    values_of(
        pool,
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = $1::regclass ORDER BY 1",
        table,
    )
    .await
}

/// The released migrations (every file but the partitioning one) on a database filled
/// through the real ingest over several months, then the partitioning migration: every
/// row survives, each in its month, and the worker still stores runs exactly once.
#[sqlx::test(migrations = false)]
async fn partitioning_converts_a_filled_database(pool: PgPool) {
    // The rows are produced by today's ingest in a scratch schema, then copied into a
    // database at the released schema (version 2), which has no `started_at` in the
    // detail tables.
    let opts = pool
        .connect_options()
        .as_ref()
        .clone()
        .options([("search_path", "scratch")]);
    sqlx::raw_sql("CREATE SCHEMA scratch")
        .execute(&pool)
        .await
        .unwrap();
    let scratch = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(opts)
        .await
        .unwrap();
    k6_ingest::db::MIGRATOR.run(&scratch).await.unwrap();
    let s = settings();
    let starts = [
        at(2025, 1, 5),
        at(2025, 2, 28),
        at(2025, 6, 1),
        at(2019, 3, 9),
    ];
    let msgs = ingest_at(&scratch, &s, &starts).await;

    let released = tempfile::tempdir().unwrap();
    let mut copied = 0;
    for f in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations")).unwrap() {
        let f = f.unwrap();
        let name = f.file_name().to_string_lossy().into_owned();
        if name.ends_with(".sql") && name.as_str() < "20261201000001" {
            std::fs::copy(f.path(), released.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    let v2 = Migrator::new(released.path()).await.unwrap();
    assert!(copied >= 2, "the migrations before partitioning: {copied}");
    assert_eq!(v2.iter().count(), copied);
    v2.run(&pool).await.unwrap();
    let copy = |table: &str, cols: &str| {
        format!("INSERT INTO public.{table} ({cols}) SELECT {cols} FROM scratch.{table}")
    };
    let cols = |table: &str| {
        let table = table.to_string();
        let pool = pool.clone();
        async move {
            let c: Vec<String> = values_of(
                &pool,
                "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::regclass \
                 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                format!("public.{table}"),
            )
            .await;
            c.join(", ")
        }
    };
    for table in RUN_TABLES {
        let c = cols(table).await;
        sqlx::raw_sql(&copy(table, &c))
            .execute(&pool)
            .await
            .unwrap();
    }
    scratch.close().await;
    sqlx::raw_sql("DROP SCHEMA scratch CASCADE")
        .execute(&pool)
        .await
        .unwrap();
    let mut before = Vec::new();
    for table in RUN_TABLES {
        before.push((table, rows_json(&pool, table, "").await));
    }
    assert_eq!(before[1].1.len(), msgs.len());
    assert!(before[2].1.len() > msgs.len(), "metrics rows copied");
    assert!(!before[3].1.is_empty() && !before[4].1.is_empty());

    k6_ingest::db::MIGRATOR.run(&pool).await.unwrap();

    // Every row is there, every column as it was (runs gained k6_archived_month, the
    // detail tables started_at: compare the rows without them).
    for (i, (table, added)) in [
        ("runs", "k6_archived_month"),
        ("k6_performance_runs", ""),
        ("k6_metrics_history", "started_at"),
        ("k6_threshold_results", "started_at"),
        ("k6_check_results", "started_at"),
    ]
    .into_iter()
    .enumerate()
    {
        let then: Vec<String> = before[i].1.clone();
        let now = rows_json(&pool, table, added).await;
        assert_eq!(now.len(), then.len(), "{table}");
        assert!(now == then, "{table}: rows changed");
    }
    for table in [
        "k6_metrics_history",
        "k6_threshold_results",
        "k6_check_results",
    ] {
        let mismatched: i64 = scalar(
            &pool,
            &format!(
                "SELECT count(*) FROM {table} d JOIN k6_performance_runs p ON p.id = d.k6_run_id \
             WHERE d.started_at <> p.started_at"
            ),
        )
        .await;
        assert_eq!(
            mismatched, 0,
            "{table}: a detail row is not in its run's month"
        );
    }
    // Each row sits in its month's partition.
    let placed: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tableoid::regclass::text, count(*) FROM k6_performance_runs GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expected: Vec<(String, i64)> = [
        month(2019, 3),
        month(2025, 1),
        month(2025, 2),
        month(2025, 6),
    ]
    .iter()
    .map(|m| {
        (
            partition_name("k6_performance_runs", *m),
            CASES.len() as i64,
        )
    })
    .collect();
    assert_eq!(placed, expected);
    for table in history::PARTITIONED {
        let parts = partitions_of(&pool, table).await;
        assert!(
            parts.contains(&partition_name(table, month(2025, 2))),
            "{table}: {parts:?}"
        );
    }

    // The worker still works: an old run again is already present, a new run of a month
    // without partitions (2040) is stored, and its partitions now exist.
    let ing = ingestor(&pool, &s).await;
    let dir = fixture_dir("v1.1.0", CASES[0]);
    let again = ing.ingest_one(&msgs[0], &ctx(&dir)).await.unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    let (future, dir) = moved(CASES[1], at(2040, 7, 14));
    let report = ing.ingest_one(&future, &ctx(&dir)).await.unwrap();
    assert_eq!(report.outcome, Outcome::Ingested);
    let report = ing.ingest_one(&future, &ctx(&dir)).await.unwrap();
    assert_eq!(report.outcome, Outcome::AlreadyPresent);
    let n: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {}",
        partition_name("k6_check_results", month(2040, 7))
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(n > 0, "the 2040 run's checks are in the 2040-07 partition");
}

/// The migration also applies to an empty database, and `partitions --ahead` creates
/// the coming months once.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn partitions_ahead_is_idempotent(pool: PgPool) {
    let db = Db::new(pool.clone(), false);
    db.probe().await.unwrap();
    let first = history::ensure_ahead(&pool, 6).await.unwrap();
    // The migration made this month and the next three; 6 ahead adds three more.
    assert_eq!(first.len(), 3, "{first:?}");
    assert!(history::ensure_ahead(&pool, 6).await.unwrap().is_empty());
    let months = history::partitioned_months(&pool).await.unwrap();
    assert_eq!(months.len(), 7);
    for table in history::PARTITIONED {
        assert_eq!(partitions_of(&pool, table).await.len(), 7, "{table}");
    }
}

/// The binary on the test's database, its archives under the prefix `hist`.
fn hist_command(args: &[&str], db_url: &str, s: &Settings) -> Command {
    let mut cmd = command(args, db_url, s);
    cmd.env("K6_INGEST__S3__PREFIX", "hist");
    cmd
}

fn k6_ingest_cmd(args: &[&str], db_url: &str, s: &Settings, abort_after: Option<&str>) -> Output {
    let mut cmd = hist_command(args, db_url, s);
    if let Some(step) = abort_after {
        cmd.env("K6_INGEST_TEST_ABORT_AFTER", step);
    }
    cmd.output().unwrap()
}

/// Archive killed after each of its steps loses nothing; then archive, a redelivery of
/// an archived run, and restore bring back every row as it was.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn archive_survives_kills_and_restore_brings_back_every_row(pool: PgPool) {
    let s = settings();
    let store = store(&s).await;
    let starts = [at(2025, 1, 10), at(2025, 2, 3), at(2025, 3, 31)];
    let msgs = ingest_at(&pool, &s, &starts).await;
    let url = database_url(&pool);
    let before = snapshot(&pool).await;

    for step in ["exported", "uploaded", "verified", "marked", "dropped"] {
        let out = k6_ingest_cmd(&["archive", "--before", "2025-03-15"], &url, &s, Some(step));
        assert!(!out.status.success(), "{step}: the process was not killed");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("aborting after step {step}")),
            "{step}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            snapshot(&pool).await,
            before,
            "killed after {step}: rows changed"
        );
        let months = history::partitioned_months(&pool).await.unwrap();
        assert!(months.contains(&month(2025, 1)), "killed after {step}");
        let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM k6_archived_months")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(archived, 0, "killed after {step}");
    }

    let out = k6_ingest_cmd(&["archive", "--before", "2025-03-15"], &url, &s, None);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2025-01: archived"), "{stdout}");
    assert!(stdout.contains("2025-02: archived"), "{stdout}");
    assert!(
        !stdout.contains("2025-03:"),
        "March is not whole before the 15th: {stdout}"
    );
    let months = history::partitioned_months(&pool).await.unwrap();
    assert!(!months.contains(&month(2025, 1)) && !months.contains(&month(2025, 2)));
    assert!(months.contains(&month(2025, 3)));
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM k6_performance_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, CASES.len() as i64, "only March's runs stay");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(runs, msgs.len() as i64, "runs rows are kept");

    // The archive in S3: a manifest whose files are there with its checksums.
    let manifest_bytes = get_object(&store, "hist/archive/2025-01/manifest.json").await;
    let manifest: history::Manifest = serde_json::from_slice(&manifest_bytes).unwrap();
    assert_eq!(manifest.month, "2025-01");
    let version: i64 =
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(manifest.schema_version, version);
    let perf = manifest
        .files
        .iter()
        .find(|f| f.table == "k6_performance_runs")
        .unwrap();
    assert_eq!(perf.rows, CASES.len() as u64);
    for f in &manifest.files {
        let body = get_object(&store, &f.key).await;
        assert_eq!(body.len() as u64, f.bytes, "{}", f.key);
        let sha: String = value_of(&pool, "SELECT encode(sha256($1), 'hex')", &body).await;
        assert_eq!(sha, f.sha256, "{}", f.key);
        assert!(f.rows > 0, "{}", f.key);
    }

    // A redelivered message of an archived run is already present: nothing is written
    // and no partition comes back for it.
    let ing = ingestor(&pool, &s).await;
    let dir = fixture_dir("v1.1.0", CASES[0]);
    let again = ing.ingest_one(&msgs[0], &ctx(&dir)).await.unwrap();
    assert_eq!(again.outcome, Outcome::AlreadyPresent);
    assert!(
        !history::partitioned_months(&pool)
            .await
            .unwrap()
            .contains(&month(2025, 1))
    );
    // Running it again archives nothing more.
    let out = k6_ingest_cmd(&["archive", "--before", "2025-03-15"], &url, &s, None);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success());
    assert!(stdout.contains("0 month(s)"), "{stdout}");

    for m in ["2025-01", "2025-02"] {
        let out = k6_ingest_cmd(&["restore", m], &url, &s, None);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(
        snapshot(&pool).await,
        before,
        "restore did not bring back every row"
    );
    let archived: i64 = sqlx::query_scalar("SELECT count(*) FROM k6_archived_months")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(archived, 0);
    // Restored runs are ordinary again.
    let out = k6_ingest_cmd(&["restore", "2025-01"], &url, &s, None);
    assert!(
        !out.status.success(),
        "a month not archived cannot be restored"
    );
}

/// A restore checks the archive: a file changed in S3 is refused and nothing loaded.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn restore_refuses_a_changed_archive(pool: PgPool) {
    let s = settings();
    let store = store(&s).await;
    ingest_at(&pool, &s, &[at(2024, 5, 5)]).await;
    history::archive_before(
        &pool,
        &store,
        "hist",
        history::parse_date("2024-06-01").unwrap(),
    )
    .await
    .unwrap();
    let key = "hist/archive/2024-05/k6_check_results.tsv.gz";
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, b"tampered\n").unwrap();
    store
        .upload_bytes(gz.finish().unwrap(), key, "application/gzip")
        .await
        .unwrap();
    let err = history::restore_month(&pool, &store, month(2024, 5))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("sha256"), "{err:#}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM k6_performance_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing restored from a changed archive");
    let still: i64 = sqlx::query_scalar("SELECT count(*) FROM k6_archived_months")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(still, 1);
}

/// Relation names scanned in an EXPLAIN (FORMAT JSON) plan; with `executed_only`, only
/// nodes that ran (EXPLAIN ANALYZE: loops > 0).
fn scanned(plan: &serde_json::Value, executed_only: bool, out: &mut Vec<String>) {
    match plan {
        serde_json::Value::Object(o) => {
            if let Some(rel) = o.get("Relation Name").and_then(|r| r.as_str()) {
                let ran = o.get("Actual Loops").and_then(|l| l.as_i64()).unwrap_or(1) > 0;
                if ran || !executed_only {
                    out.push(rel.to_string());
                }
            }
            o.values().for_each(|v| scanned(v, executed_only, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| scanned(v, executed_only, out)),
        _ => {}
    }
}

/// The relations the plan of `explain` (an EXPLAIN in JSON) scans, and the plan.
async fn scans(
    pool: &PgPool,
    explain: &str,
    executed_only: bool,
) -> (Vec<String>, serde_json::Value) {
    let plan: serde_json::Value = scalar(pool, explain).await;
    (relations(&plan, executed_only), plan)
}

/// The relations a plan scans, sorted, each once.
fn relations(plan: &serde_json::Value, executed_only: bool) -> Vec<String> {
    let mut rels = Vec::new();
    scanned(plan, executed_only, &mut rels);
    rels.sort();
    rels.dedup();
    rels
}

/// With 14 months of generated history, the dashboard's questions read only the
/// partitions they need.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn dashboard_queries_read_only_the_months_they_need(pool: PgPool) {
    let (project, test) = (Uuid::now_v7(), Uuid::now_v7());
    let first = month(2025, 1);
    for i in 0..14 {
        let m = first.checked_add_months(chrono::Months::new(i)).unwrap();
        sqlx::query("SELECT k6_ensure_month($1)")
            .bind(m)
            .execute(&pool)
            .await
            .unwrap();
    }
    // 40 runs a day for 14 months, over two locations.
    sqlx::raw_sql(&format!(
        "INSERT INTO runs (id, test_id, organization_id, project_id, status, started_at)
         SELECT gen_random_uuid(), '{test}', '{project}', '{project}', 'passed',
                timestamptz '2025-01-01 00:00:00+00' + g * interval '36 minutes'
         FROM generate_series(0, 40 * 424 - 1) g;
         INSERT INTO k6_performance_runs (id, run_id, test_id, organization_id, project_id,
                location, status, started_at, p95_response_time_ms)
         SELECT gen_random_uuid(), id, test_id, organization_id, project_id,
                CASE WHEN random() < 0.5 THEN 'us-east' ELSE 'eu-west' END, 'passed',
                started_at, (random() * 500)::bigint
         FROM runs;
         INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, scale, p95_value,
                started_at)
         SELECT gen_random_uuid(), p.id, m, m, 1000, 1, p.started_at
         FROM k6_performance_runs p, unnest(ARRAY['http_req_duration', 'iterations']) m;
         ANALYZE;"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let months = history::partitioned_months(&pool).await.unwrap();
    assert!(months.len() >= 14, "{months:?}");

    let static_plans = [
        // p95 of a test over time within a date range: two months, planned statically.
        (
            format!(
                "EXPLAIN (FORMAT JSON) SELECT started_at, p95_response_time_ms FROM k6_performance_runs \
                 WHERE test_id = '{test}' AND location = 'us-east' \
                 AND started_at >= '2025-04-01 00:00:00+00' AND started_at < '2025-06-01 00:00:00+00' \
                 ORDER BY started_at"
            ),
            vec![
                partition_name("k6_performance_runs", month(2025, 4)),
                partition_name("k6_performance_runs", month(2025, 5)),
            ],
        ),
        // One metric of a test over a month: the detail table is pruned too when the
        // query bounds its own started_at (a range does not travel through the join's
        // equality).
        (
            format!(
                "EXPLAIN (FORMAT JSON) SELECT p.started_at, m.p95_value FROM k6_performance_runs p \
                 JOIN k6_metrics_history m ON m.k6_run_id = p.id AND m.started_at = p.started_at \
                 WHERE p.test_id = '{test}' AND m.metric_name = 'http_req_duration' \
                 AND p.started_at >= '2025-04-01 00:00:00+00' AND p.started_at < '2025-05-01 00:00:00+00' \
                 AND m.started_at >= '2025-04-01 00:00:00+00' AND m.started_at < '2025-05-01 00:00:00+00'"
            ),
            vec![
                partition_name("k6_metrics_history", month(2025, 4)),
                partition_name("k6_performance_runs", month(2025, 4)),
            ],
        ),
    ];
    for (explain, expected) in static_plans {
        let (rels, plan) = scans(&pool, &explain, false).await;
        assert_eq!(rels, expected, "{plan}");
    }

    // The same with the range as parameters (a prepared statement): pruned at run time.
    let plan: serde_json::Value = sqlx::query_scalar(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT started_at, p95_response_time_ms \
         FROM k6_performance_runs WHERE test_id = $1 AND location = 'us-east' \
         AND started_at >= $2 AND started_at < $3 ORDER BY started_at",
    )
    .bind(test)
    .bind(at(2025, 9, 1) - Duration::hours(12))
    .bind(at(2025, 10, 1) - Duration::hours(12))
    .fetch_one(&pool)
    .await
    .unwrap();
    let rels = relations(&plan, true);
    assert_eq!(
        rels,
        vec![partition_name("k6_performance_runs", month(2025, 9))],
        "{plan}"
    );

    // Latest runs of a project in a location: newest month first, stopping early.
    let (rels, plan) = scans(&pool, &format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) SELECT run_id, status, started_at, p95_response_time_ms \
         FROM k6_performance_runs WHERE project_id = '{project}' AND location = 'eu-west' \
         ORDER BY started_at DESC LIMIT 20"
    ), true).await;
    // Newer months (created ahead by the migration) are empty and cost an index probe;
    // of the months with rows only the newest is read.
    let newest_with_rows = partition_name("k6_performance_runs", month(2026, 2));
    assert!(rels.contains(&newest_with_rows), "{plan}");
    let older: Vec<&String> = rels.iter().filter(|r| **r < newest_with_rows).collect();
    assert!(
        older.is_empty(),
        "older months were read: {older:?}\n{plan}"
    );
}

/// Two deliveries of one run that disagree on its start (so on its month) at the same
/// time: the partitioned unique key cannot see them as one, the `runs` row lock does.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn concurrent_duplicates_in_different_months_store_one_run(pool: PgPool) {
    let env = TestEnv::new(&pool).await;
    let ing = &env.ing;
    for round in 0..4 {
        let (a, dir) = moved(CASES[round % CASES.len()], at(2025, 4, 30));
        let mut b = a.clone();
        b.started_at = at(2025, 5, 1);
        b.completed_at = a.completed_at.map(|c| c + Duration::days(1));
        let c = ctx(&dir);
        let (ra, rb) = tokio::join!(ing.ingest_one(&a, &c), ing.ingest_one(&b, &c));
        let mut outcomes = [ra.unwrap().outcome, rb.unwrap().outcome];
        outcomes.sort_by_key(|o| format!("{o:?}"));
        assert_eq!(
            outcomes,
            [Outcome::AlreadyPresent, Outcome::Ingested],
            "round {round}"
        );
        let n: i64 = value_of(
            &pool,
            "SELECT count(*) FROM k6_performance_runs WHERE run_id = $1",
            a.run_id,
        )
        .await;
        assert_eq!(n, 1, "round {round}: one k6_performance_runs row per run");
        let orphans: i64 = value_of(
            &pool,
            "SELECT count(*) FROM k6_metrics_history m JOIN k6_performance_runs p \
             ON p.id = m.k6_run_id WHERE p.run_id = $1 AND m.started_at <> p.started_at",
            a.run_id,
        )
        .await;
        assert_eq!(orphans, 0);
    }
}

/// `archive` without `--before` or `--hot-months` keeps `retention.hot_months` whole
/// months before the current one: with 2, a run four months back is archived, one from
/// last month stays.
#[sqlx::test(migrator = "k6_ingest::db::MIGRATOR")]
async fn archive_without_arguments_follows_the_retention_setting(pool: PgPool) {
    let s = settings();
    let this_month = k6_ingest::db::month_of(Utc::now());
    let old = this_month - chrono::Months::new(4);
    let recent = this_month - chrono::Months::new(1);
    let to_time = |d: NaiveDate| at(d.year(), d.month(), 10);
    ingest_at(&pool, &s, &[to_time(old), to_time(recent)]).await;
    let url = database_url(&pool);

    let out = hist_command(&["archive"], &url, &s)
        .env("K6_INGEST__RETENTION__HOT_MONTHS", "2")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let label = |d: NaiveDate| format!("{:04}-{:02}", d.year(), d.month());
    assert!(
        stdout.contains(&format!("{}: archived", label(old))),
        "{stdout}"
    );
    assert!(!stdout.contains(&label(recent)), "{stdout}");
    let months = history::partitioned_months(&pool).await.unwrap();
    assert!(
        !months.contains(&old) && months.contains(&recent),
        "{months:?}"
    );
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM k6_performance_runs")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(left, CASES.len() as i64, "only last month's runs stay");
}
