//! The SQL of [`crate::history`]: monthly partitions, a month's archive through `COPY`,
//! and its restore. The callers hold the transaction; every function here takes its
//! connection.
//!
//! Static statements are checked at compile time (`checked!`), except
//! [`schema_version`], which reads sqlx's own `_sqlx_migrations`. The rest is built at
//! run time, for two reasons: a month's partition is a table of its own, so a statement
//! naming it cannot be written before the month is known; and `COPY` takes no
//! parameters, so its column list is read from the catalog and written into the text.
//! Every name put into such a statement goes through [`quote_ident`].

use bytes::Bytes;
use chrono::{Datelike, NaiveDate};
use futures_util::stream::BoxStream;
use sqlx::postgres::{PgArguments, PgCopyIn};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Row};

/// The partitioned tables, the referenced one first (creation and restore order).
pub const PARTITIONED: [&str; 4] = [
    "k6_performance_runs",
    "k6_metrics_history",
    "k6_threshold_results",
    "k6_check_results",
];

/// The temporary table a restore loads archived `runs` rows into, so that only the
/// missing ones are inserted.
const RESTORE_RUNS: &str = "k6_restore_runs";

/// The statement maker `checked!` is given here. History's statements are always
/// unnamed, whatever `database.prepared_statements` says: the maintenance commands run
/// rarely, and may go through the same transaction pooler as the worker.
struct Unnamed;

impl Unnamed {
    fn query<'q>(&self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(false)
    }
}

/// The name of a month's partition of `table`: `<table>_yYYYYmMM`, as `k6_ensure_month`
/// names it.
pub fn partition_name(table: &str, month: NaiveDate) -> String {
    format!("{table}_y{:04}m{:02}", month.year(), month.month())
}

/// The month's partition of every partitioned table, in [`PARTITIONED`] order.
fn month_partitions(month: NaiveDate) -> Vec<String> {
    PARTITIONED
        .iter()
        .map(|t| partition_name(t, month))
        .collect()
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn column_list(cols: &[String]) -> String {
    cols.iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Creates the month's partitions that are missing (`k6_ensure_month`); returns how many
/// tables it created.
pub async fn ensure_month(conn: &mut PgConnection, month: NaiveDate) -> Result<i32, sqlx::Error> {
    checked!(Unnamed, "SELECT k6_ensure_month($1) AS made", month)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)
}

/// The months that have a `k6_performance_runs` partition, oldest first.
pub async fn partitioned_months(conn: &mut PgConnection) -> Result<Vec<NaiveDate>, sqlx::Error> {
    let rows = checked!(
        Unnamed,
        "SELECT c.relname::text AS name FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'k6_performance_runs'::regclass"
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut months = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get(0)?;
        if let Some(month) = month_of_partition(&name) {
            months.push(month);
        }
    }
    months.sort();
    Ok(months)
}

/// The month of a `k6_performance_runs` partition's name, the reverse of
/// [`partition_name`].
fn month_of_partition(name: &str) -> Option<NaiveDate> {
    let rest = name.strip_prefix("k6_performance_runs_y")?;
    let (y, m) = rest.split_once('m')?;
    NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)
}

/// Whether the month's `k6_performance_runs` partition exists.
pub async fn month_is_partitioned(
    conn: &mut PgConnection,
    month: NaiveDate,
) -> Result<bool, sqlx::Error> {
    let part = partition_name("k6_performance_runs", month);
    checked!(
        Unnamed,
        "SELECT to_regclass($1) IS NOT NULL AS present",
        part.as_str()
    )
    .fetch_one(&mut *conn)
    .await?
    .try_get(0)
}

/// The non-generated columns of `table`, in order; empty if there is no such table.
async fn columns(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    // `::text::regclass`: a parameter typed `regclass` has no Rust type to check against.
    let rows = checked!(
        Unnamed,
        "SELECT attname::text AS name FROM pg_attribute WHERE attrelid = $1::text::regclass \
         AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
        table
    )
    .fetch_all(&mut *conn)
    .await?;
    let cols = rows
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<Vec<String>, _>>()?;
    if cols.is_empty() {
        anyhow::bail!("table {table} not found");
    }
    Ok(cols)
}

/// The last migration applied. Not checked at compile time: `_sqlx_migrations` is sqlx's
/// own table, made by the migrator at run time, not part of the schema checked against.
pub async fn schema_version(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .persistent(false)
        .fetch_one(&mut *conn)
        .await
}

/// A month's row in `k6_archived_months`: where its manifest is, and its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedMonth {
    pub manifest_uri: String,
    pub manifest_sha256: String,
}

pub async fn archived_month(
    conn: &mut PgConnection,
    month: NaiveDate,
) -> Result<Option<ArchivedMonth>, sqlx::Error> {
    let row = checked!(
        Unnamed,
        "SELECT manifest_uri, manifest_sha256 FROM k6_archived_months WHERE month = $1",
        month
    )
    .fetch_optional(&mut *conn)
    .await?;
    row.map(|r| {
        Ok(ArchivedMonth {
            manifest_uri: r.try_get(0)?,
            manifest_sha256: r.try_get(1)?,
        })
    })
    .transpose()
}

/// Locks the month's partitions against writes for the rest of the transaction: writes
/// into this month wait until the archive commits or fails; readers do not.
pub async fn lock_month_for_archive(
    conn: &mut PgConnection,
    month: NaiveDate,
) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("SET LOCAL lock_timeout = '60s'")
        .execute(&mut *conn)
        .await?;
    let parts = month_partitions(month);
    let list = parts
        .iter()
        .map(|p| quote_ident(p))
        .collect::<Vec<_>>()
        .join(", ");
    sqlx::raw_sql(&format!("LOCK TABLE {list} IN SHARE MODE"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// One file of a month's archive: the table it holds, its columns in the file's order
/// (generated columns left out: they are computed on restore), and the `COPY` that
/// writes it.
pub struct Export {
    pub table: String,
    pub columns: Vec<String>,
    copy: String,
}

/// The month's exports: the `runs` rows of its runs first (kept in the database too;
/// archived so that the archive is complete on its own), then each partition.
pub async fn month_exports(
    conn: &mut PgConnection,
    month: NaiveDate,
) -> anyhow::Result<Vec<Export>> {
    let perf_part = partition_name("k6_performance_runs", month);
    let run_cols = columns(conn, "runs").await?;
    let mut exports = vec![Export {
        table: "runs".to_string(),
        copy: format!(
            "COPY (SELECT {} FROM runs WHERE id IN (SELECT run_id FROM {})) TO STDOUT",
            column_list(&run_cols),
            quote_ident(&perf_part)
        ),
        columns: run_cols,
    }];
    for (table, part) in PARTITIONED.iter().zip(month_partitions(month)) {
        let cols = columns(conn, table).await?;
        exports.push(Export {
            table: table.to_string(),
            copy: format!(
                "COPY {} ({}) TO STDOUT",
                quote_ident(&part),
                column_list(&cols)
            ),
            columns: cols,
        });
    }
    Ok(exports)
}

/// Runs an export's `COPY ... TO STDOUT`: its text format, a chunk at a time.
pub async fn copy_out<'c>(
    conn: &'c mut PgConnection,
    export: &Export,
) -> Result<BoxStream<'c, Result<Bytes, sqlx::Error>>, sqlx::Error> {
    conn.copy_out_raw(&export.copy).await
}

/// What `k6_archived_months` records of an archived month.
pub struct ArchiveRecord<'a> {
    pub manifest_uri: &'a str,
    pub manifest_sha256: &'a str,
    /// Rows per file, by table.
    pub row_counts: &'a serde_json::Map<String, serde_json::Value>,
    pub schema_version: i64,
}

/// Marks the month's runs as archived and records the month in `k6_archived_months`.
pub async fn mark_archived(
    conn: &mut PgConnection,
    month: NaiveDate,
    record: &ArchiveRecord<'_>,
) -> Result<(), sqlx::Error> {
    let perf_part = partition_name("k6_performance_runs", month);
    sqlx::query(&format!(
        "UPDATE runs SET k6_archived_month = $1 WHERE id IN (SELECT run_id FROM {})",
        quote_ident(&perf_part)
    ))
    .persistent(false)
    .bind(month)
    .execute(&mut *conn)
    .await?;
    checked!(
        Unnamed,
        "INSERT INTO k6_archived_months (month, manifest_uri, manifest_sha256, row_counts, schema_version) \
         VALUES ($1, $2, $3, $4, $5)",
        month,
        record.manifest_uri,
        record.manifest_sha256,
        _ Json(record.row_counts),
        record.schema_version
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Detaches and drops the month's partitions.
pub async fn drop_month(conn: &mut PgConnection, month: NaiveDate) -> Result<(), sqlx::Error> {
    // Detaching locks the parents (and, through the foreign keys, `runs`): take those
    // locks in the order a run's write takes them, so writes in flight finish first
    // instead of deadlocking with the archive. Readers wait only for the drop itself.
    sqlx::raw_sql(
        "LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE; \
         LOCK TABLE k6_performance_runs, k6_metrics_history, k6_threshold_results, \
         k6_check_results IN ACCESS EXCLUSIVE MODE",
    )
    .execute(&mut *conn)
    .await?;
    // Detail partitions first: their foreign keys point at the runs partition.
    for (table, part) in PARTITIONED.iter().zip(month_partitions(month)).rev() {
        sqlx::raw_sql(&format!(
            "ALTER TABLE {} DETACH PARTITION {}; DROP TABLE {}",
            quote_ident(table),
            quote_ident(&part),
            quote_ident(&part)
        ))
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Creates the temporary table archived `runs` rows are loaded into (dropped at commit);
/// returns its name, the target of [`copy_in`].
pub async fn create_restore_runs(conn: &mut PgConnection) -> Result<&'static str, sqlx::Error> {
    sqlx::raw_sql("CREATE TEMPORARY TABLE k6_restore_runs (LIKE runs) ON COMMIT DROP")
        .execute(&mut *conn)
        .await?;
    Ok(RESTORE_RUNS)
}

/// Inserts the loaded `runs` rows that are missing (the others stayed in the database);
/// returns how many.
pub async fn insert_missing_runs(
    conn: &mut PgConnection,
    columns: &[String],
) -> Result<u64, sqlx::Error> {
    let cols = column_list(columns);
    let done = sqlx::raw_sql(&format!(
        "INSERT INTO runs ({cols}) SELECT {cols} FROM {RESTORE_RUNS} ON CONFLICT (id) DO NOTHING"
    ))
    .execute(&mut *conn)
    .await?;
    Ok(done.rows_affected())
}

/// Starts `COPY target (columns) FROM STDIN`.
pub async fn copy_in<'c>(
    conn: &'c mut PgConnection,
    target: &str,
    columns: &[String],
) -> Result<PgCopyIn<&'c mut PgConnection>, sqlx::Error> {
    conn.copy_in_raw(&format!(
        "COPY {} ({}) FROM STDIN",
        quote_ident(target),
        column_list(columns)
    ))
    .await
}

/// Unmarks the month's runs and removes its `k6_archived_months` row, once restored.
pub async fn forget_archived(conn: &mut PgConnection, month: NaiveDate) -> Result<(), sqlx::Error> {
    checked!(
        Unnamed,
        "UPDATE runs SET k6_archived_month = NULL WHERE k6_archived_month = $1",
        month
    )
    .execute(&mut *conn)
    .await?;
    checked!(
        Unnamed,
        "DELETE FROM k6_archived_months WHERE month = $1",
        month
    )
    .execute(&mut *conn)
    .await?;
    Ok(())
}
