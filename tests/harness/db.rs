//! Queries tests assert with: what a run stored, and what every table holds.

use std::collections::BTreeMap;

use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres};
use uuid::Uuid;

/// The tables a run is written to.
pub const RUN_TABLES: [&str; 5] = [
    "runs",
    "k6_performance_runs",
    "k6_metrics_history",
    "k6_threshold_results",
    "k6_check_results",
];

/// A session reading `k6_performance_runs` in a transaction left open, as a dashboard's
/// report or `pg_dump` does: its lock stands until the transaction ends.
pub async fn reading_k6_tables(pool: &PgPool) -> sqlx::Transaction<'static, Postgres> {
    let mut reader = pool.begin().await.unwrap();
    sqlx::query("SELECT count(*) FROM k6_performance_runs")
        .execute(&mut *reader)
        .await
        .unwrap();
    reader
}

/// The year of a stored run's `started_at`: which month's partition holds it.
pub async fn started_year(pool: &PgPool, run: Uuid) -> i32 {
    value_of(
        pool,
        "SELECT extract(year FROM started_at)::int FROM k6_performance_runs WHERE run_id = $1",
        run,
    )
    .await
}

/// The database URL of a `#[sqlx::test]` pool, for the binary in a child process.
pub fn database_url(pool: &PgPool) -> String {
    let db = pool.connect_options().get_database().unwrap().to_string();
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let mut url = url::Url::parse(&base).unwrap();
    url.set_path(&db);
    url.to_string()
}

/// One row of `sql`, whose only parameter `$1` is `param` (mostly a run id).
pub async fn row_of<'q, T, P>(pool: &PgPool, sql: &'q str, param: P) -> T
where
    T: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
    P: 'q + Send + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
{
    sqlx::query_as(sql)
        .bind(param)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The single value of `sql`, whose only parameter `$1` is `param`.
pub async fn value_of<'q, T, P>(pool: &PgPool, sql: &'q str, param: P) -> T
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
    P: 'q + Send + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
{
    row_of::<(T,), P>(pool, sql, param).await.0
}

/// Every value of `sql`, whose only parameter `$1` is `param`.
pub async fn values_of<'q, T, P>(pool: &PgPool, sql: &'q str, param: P) -> Vec<T>
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
    P: 'q + Send + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>,
{
    sqlx::query_scalar(sql)
        .bind(param)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// The single value of a query without parameters.
pub async fn scalar<T>(pool: &PgPool, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(pool)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A run's `runs.status` and `runs.error_details` (`String` where it must be set,
/// `Option<String>` where it may be NULL).
pub async fn run_status<D>(pool: &PgPool, run: Uuid) -> (String, D)
where
    D: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
{
    row_of(
        pool,
        "SELECT status, error_details FROM runs WHERE id = $1",
        run,
    )
    .await
}

/// A run's `k6_performance_runs.warnings`, as JSON text.
pub async fn perf_warnings(pool: &PgPool, run: Uuid) -> String {
    let w: Value = value_of(
        pool,
        "SELECT warnings FROM k6_performance_runs WHERE run_id = $1",
        run,
    )
    .await;
    w.to_string()
}

/// How many metric rows a run has.
pub async fn metric_rows(pool: &PgPool, run: Uuid) -> i64 {
    value_of(
        pool,
        "SELECT count(*) FROM k6_metrics_history h JOIN k6_performance_runs p ON p.id = h.k6_run_id \
         WHERE p.run_id = $1",
        run,
    )
    .await
}

/// How many metric, threshold and check rows a run has.
pub async fn detail_rows(pool: &PgPool, run: Uuid) -> i64 {
    value_of(
        pool,
        "SELECT (SELECT count(*) FROM k6_metrics_history m WHERE m.k6_run_id = p.id) \
              + (SELECT count(*) FROM k6_threshold_results t WHERE t.k6_run_id = p.id) \
              + (SELECT count(*) FROM k6_check_results c WHERE c.k6_run_id = p.id) \
         FROM k6_performance_runs p WHERE p.run_id = $1",
        run,
    )
    .await
}

/// How many of `ids` have their `runs` and `k6_performance_runs` rows.
pub async fn stored(pool: &PgPool, ids: &[Uuid]) -> i64 {
    value_of(
        pool,
        "SELECT count(*) FROM runs r JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = ANY($1)",
        ids,
    )
    .await
}

/// How many `runs` and `k6_performance_runs` rows belong to `ids`.
pub async fn run_rows(pool: &PgPool, ids: &[Uuid]) -> (i64, i64) {
    row_of(
        pool,
        "SELECT (SELECT count(*) FROM runs WHERE id = ANY($1)), \
                (SELECT count(*) FROM k6_performance_runs WHERE run_id = ANY($1))",
        ids,
    )
    .await
}

/// Every row of the run tables as text, ordered, per table (partition-independent).
pub async fn snapshot(pool: &PgPool) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for table in RUN_TABLES {
        let rows: Vec<String> =
            sqlx::query_scalar(&format!("SELECT t::text FROM {table} t ORDER BY t::text"))
                .fetch_all(pool)
                .await
                .unwrap();
        out.push((table.to_string(), rows));
    }
    out
}

/// Row count and a hash of every row of each run table, for "nothing changed" assertions.
pub async fn table_digest(pool: &PgPool) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    for table in RUN_TABLES {
        let (n, md5): (i64, Option<String>) = sqlx::query_as(&format!(
            "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        out.push((table.to_string(), n, md5.unwrap_or_default()));
    }
    out
}

/// Row counts of every table in the schema the migrations create.
pub async fn rows_per_table(pool: &PgPool) -> Vec<(String, i64)> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE' AND table_name <> '_sqlx_migrations' \
         ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(tables.len() >= 5, "{tables:?}");
    let mut out = Vec::new();
    for table in tables {
        let n: i64 = scalar(pool, &format!("SELECT count(*) FROM \"{table}\"")).await;
        out.push((table, n));
    }
    out
}

/// Asserts that no table of the schema holds a row.
pub async fn assert_no_rows(pool: &PgPool, why: &str) {
    for (table, n) in rows_per_table(pool).await {
        assert_eq!(n, 0, "{table} written {why}");
    }
}

/// Every run written exactly once: one `runs` row, one `k6_performance_runs` row, and
/// as many metric rows as every other run of the same fixture case.
pub async fn assert_each_stored_once(pool: &PgPool, msgs: &[Value]) {
    let ids = super::run_ids(msgs);
    assert_eq!(
        run_rows(pool, &ids).await,
        (ids.len() as i64, ids.len() as i64),
        "one runs row and one k6_performance_runs row per run"
    );
    let mut per_case = BTreeMap::<String, i64>::new();
    for (m, id) in msgs.iter().zip(&ids) {
        let case = m["metadata"]["case"].as_str().unwrap().to_string();
        let n = metric_rows(pool, *id).await;
        let expected = *per_case.entry(case.clone()).or_insert(n);
        assert_eq!(
            n, expected,
            "metric rows of a {case} run differ from another {case} run"
        );
        assert!(n > 0, "{case} has metric rows");
    }
}
