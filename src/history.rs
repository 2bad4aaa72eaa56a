//! History at scale: monthly partitions, archives of whole months in S3, and restores.
//!
//! `k6_performance_runs` and its detail tables are partitioned by month on the run's
//! `started_at` (migration `20261201000001_monthly_partitions.sql`). This module holds
//! the maintenance commands:
//!
//! - [`ensure_ahead`] (`k6-ingest partitions --ahead N`): creates this month's and the
//!   next N months' partitions, so the worker rarely has to (it still can: a run of any
//!   month is stored, see `db::Db::ensure_month`).
//! - [`archive_before`] (`k6-ingest archive --before DATE`): each whole month before
//!   DATE is written to S3, read back and verified, and only then its partitions are
//!   detached and dropped. Everything the database does for one month happens in ONE
//!   transaction, committed after the verification: killed at any point, the month is
//!   either still in the database (S3 objects written so far are overwritten by the next
//!   run) or archived and recorded in `k6_archived_months`.
//! - [`restore_month`] (`k6-ingest restore YYYY-MM`): loads a month back, row for row,
//!   in one transaction, checking every file's SHA-256 and row count against the
//!   manifest before committing.
//!
//! Layout in the worker's bucket, under `<s3.prefix>/archive/<YYYY-MM>/`:
//! `runs.tsv.gz`, `k6_performance_runs.tsv.gz`, `k6_metrics_history.tsv.gz`,
//! `k6_threshold_results.tsv.gz`, `k6_check_results.tsv.gz` (PostgreSQL `COPY` text
//! format, one row a line, gzip) and `manifest.json` (month, schema version = the last
//! applied migration, per file: table, columns, rows, bytes, SHA-256 of the object).
//! Generated columns (the key hashes) are not archived; they are computed on restore.
//!
//! Archived runs keep their `runs` row (the anchor of "stored once" and of tenancy),
//! marked with `runs.k6_archived_month`: a redelivered message of such a run is
//! "already present" and never written into a dropped month.

use std::io::Write;
use std::path::Path;

use anyhow::{Context as _, anyhow, bail};
use chrono::{Datelike, Months, NaiveDate, Utc};
use flate2::Compression;
use flate2::write::{GzDecoder, GzEncoder};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Postgres, Row, Transaction};

use crate::s3::ArtifactStore;

/// The partitioned tables, the referenced one first (creation and restore order).
pub const PARTITIONED: [&str; 4] = [
    "k6_performance_runs",
    "k6_metrics_history",
    "k6_threshold_results",
    "k6_check_results",
];

/// Test hook: `K6_INGEST_TEST_ABORT_AFTER=<step>` aborts the process right after that
/// step of an archive (exported, uploaded, verified, marked, dropped), as a crash or
/// a kill would, so tests can show that an interrupted archive loses nothing.
const ABORT_AFTER_ENV: &str = "K6_INGEST_TEST_ABORT_AFTER";

fn checkpoint(step: &str) {
    if std::env::var(ABORT_AFTER_ENV).is_ok_and(|s| s == step) {
        eprintln!("k6-ingest: aborting after step {step} ({ABORT_AFTER_ENV})");
        std::process::abort();
    }
}

/// The name of a month's partition of `table`: `<table>_yYYYYmMM`.
pub fn partition_name(table: &str, month: NaiveDate) -> String {
    format!("{table}_y{:04}m{:02}", month.year(), month.month())
}

/// `YYYY-MM` as the first day of that month.
pub fn parse_month(s: &str) -> anyhow::Result<NaiveDate> {
    NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d")
        .ok()
        .filter(|_| s.len() == 7)
        .ok_or_else(|| anyhow!("invalid month {s:?}: expected YYYY-MM"))
}

/// `YYYY-MM-DD`.
pub fn parse_date(s: &str) -> anyhow::Result<NaiveDate> {
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map_err(|_| anyhow!("invalid date {s:?}: expected YYYY-MM-DD (UTC)"))
}

/// The first day of the oldest month `--hot-months n` keeps: `n` whole months before
/// the current one (UTC), which is kept too.
pub fn hot_months_start(now: chrono::DateTime<Utc>, n: u32) -> anyhow::Result<NaiveDate> {
    crate::db::month_of(now)
        .checked_sub_months(Months::new(n))
        .ok_or_else(|| anyhow!("--hot-months {n} is out of range"))
}

fn month_label(month: NaiveDate) -> String {
    format!("{:04}-{:02}", month.year(), month.month())
}

fn next_month(month: NaiveDate) -> NaiveDate {
    month
        .checked_add_months(Months::new(1))
        .unwrap_or(NaiveDate::MAX)
}

/// Creates the partitions of this month (UTC) and the `ahead` next ones; returns the
/// months for which at least one table was created. Idempotent.
pub async fn ensure_ahead(pool: &PgPool, ahead: u32) -> anyhow::Result<Vec<NaiveDate>> {
    let first = crate::db::month_of(Utc::now());
    let mut created = Vec::new();
    for i in 0..=ahead {
        let month = first
            .checked_add_months(Months::new(i))
            .ok_or_else(|| anyhow!("month out of range"))?;
        let mut tx = pool.begin().await?;
        let made: i32 = sqlx::query_scalar("SELECT k6_ensure_month($1)")
            .persistent(false)
            .bind(month)
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        if made > 0 {
            created.push(month);
        }
    }
    Ok(created)
}

/// The months that have a `k6_performance_runs` partition, oldest first.
pub async fn partitioned_months(pool: &PgPool) -> anyhow::Result<Vec<NaiveDate>> {
    // In a transaction, as every statement is: an unnamed statement outside one may be
    // split across server connections by a transaction pooler.
    let mut tx = pool.begin().await?;
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'k6_performance_runs'::regclass",
    )
    .persistent(false)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut months: Vec<NaiveDate> = names
        .iter()
        .filter_map(|n| {
            let rest = n.strip_prefix("k6_performance_runs_y")?;
            let (y, m) = rest.split_once('m')?;
            NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)
        })
        .collect();
    months.sort();
    Ok(months)
}

/// One archived file, as the manifest describes it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArchivedFile {
    pub table: String,
    pub key: String,
    /// The columns in the file's order (generated columns are left out).
    pub columns: Vec<String>,
    pub rows: u64,
    /// Size of the gzip object.
    pub bytes: u64,
    /// SHA-256 of the gzip object, hex.
    pub sha256: String,
}

/// `manifest.json` of an archived month.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub format: String,
    /// `YYYY-MM`.
    pub month: String,
    /// The last migration applied when the month was archived.
    pub schema_version: i64,
    pub created_at: chrono::DateTime<Utc>,
    pub files: Vec<ArchivedFile>,
}

const MANIFEST_FORMAT: &str = "k6-ingest-archive/1";

/// What happened to one month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MonthOutcome {
    Archived {
        manifest_key: String,
        rows: u64,
        bytes: u64,
    },
    AlreadyArchived,
}

/// Where a month's archive goes: `<prefix>/archive/<YYYY-MM>/`.
pub fn archive_dir(prefix: &str, month: NaiveDate) -> String {
    let tail = format!("archive/{}/", month_label(month));
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        tail
    } else {
        format!("{prefix}/{tail}")
    }
}

/// Archives every partitioned month that ends on or before `before` (whole months only).
pub async fn archive_before(
    pool: &PgPool,
    store: &ArtifactStore,
    prefix: &str,
    before: NaiveDate,
) -> anyhow::Result<Vec<(NaiveDate, MonthOutcome)>> {
    let mut out = Vec::new();
    for month in partitioned_months(pool).await? {
        if next_month(month) > before {
            continue;
        }
        let outcome = archive_month(pool, store, prefix, month)
            .await
            .with_context(|| format!("archive of {}", month_label(month)))?;
        out.push((month, outcome));
    }
    Ok(out)
}

/// The non-generated columns of `table`, in order.
async fn columns(conn: &mut PgConnection, table: &str) -> anyhow::Result<Vec<String>> {
    let cols: Vec<String> = sqlx::query_scalar(
        "SELECT attname::text FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 \
         AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
    )
    .persistent(false)
    .bind(table)
    .fetch_all(&mut *conn)
    .await?;
    if cols.is_empty() {
        bail!("table {table} not found");
    }
    Ok(cols)
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

/// A writer that hashes and counts what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Streams `COPY ... TO STDOUT` through gzip into `path`: (rows, bytes, sha256).
async fn export_to_file(
    conn: &mut PgConnection,
    copy_sql: &str,
    path: &Path,
) -> anyhow::Result<(u64, u64, String)> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let sink = Hashing {
        inner: std::io::BufWriter::new(file),
        hasher: Sha256::new(),
        bytes: 0,
    };
    let mut gz = GzEncoder::new(sink, Compression::default());
    let mut rows = 0u64;
    let mut stream = conn.copy_out_raw(copy_sql).await?;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        // COPY's text format escapes newlines inside values: one row, one line.
        rows += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        gz.write_all(&chunk)?;
    }
    drop(stream);
    let mut sink = gz.finish()?;
    sink.flush()?;
    Ok((rows, sink.bytes, hex::encode(sink.hasher.finalize())))
}

/// Reads an object back: (bytes, sha256 of the object, rows after gunzip).
async fn read_back(store: &ArtifactStore, key: &str) -> anyhow::Result<(u64, String, u64)> {
    let out = get_object(store, key).await?;
    let mut body = out.body;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut gunzip = GzDecoder::new(LineCounter::default());
    while let Some(chunk) = body
        .try_next()
        .await
        .with_context(|| format!("reading {key}"))?
    {
        hasher.update(&chunk);
        bytes += chunk.len() as u64;
        gunzip.write_all(&chunk)?;
    }
    let counter = gunzip.finish()?;
    Ok((bytes, hex::encode(hasher.finalize()), counter.lines))
}

#[derive(Default)]
struct LineCounter {
    lines: u64,
}

impl Write for LineCounter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lines += buf.iter().filter(|b| **b == b'\n').count() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn schema_version(conn: &mut PgConnection) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
            .persistent(false)
            .fetch_one(&mut *conn)
            .await?,
    )
}

async fn archived_row(
    conn: &mut PgConnection,
    month: NaiveDate,
) -> anyhow::Result<Option<(String, String)>> {
    Ok(
        sqlx::query(
            "SELECT manifest_uri, manifest_sha256 FROM k6_archived_months WHERE month = $1",
        )
        .persistent(false)
        .bind(month)
        .fetch_optional(&mut *conn)
        .await?
        .map(|r| (r.get(0), r.get(1))),
    )
}

/// Archives one month; see the module documentation for the steps and guarantees.
pub async fn archive_month(
    pool: &PgPool,
    store: &ArtifactStore,
    prefix: &str,
    month: NaiveDate,
) -> anyhow::Result<MonthOutcome> {
    let label = month_label(month);
    let mut tx = pool.begin().await?;
    let perf_part = partition_name("k6_performance_runs", month);
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .persistent(false)
        .bind(&perf_part)
        .fetch_one(&mut *tx)
        .await?;
    let already = archived_row(&mut tx, month).await?;
    match (exists, already) {
        (false, Some(_)) => return Ok(MonthOutcome::AlreadyArchived),
        (false, None) => bail!("month {label} has no partitions"),
        (true, Some((uri, _))) => bail!(
            "month {label} was archived to {uri} and has rows again (runs stored since): \
             restore it first (`k6-ingest restore {label}`), then archive it"
        ),
        (true, None) => {}
    }
    // Writes into this month wait until the archive commits or fails; readers do not.
    sqlx::raw_sql("SET LOCAL lock_timeout = '60s'")
        .execute(&mut *tx)
        .await?;
    let parts: Vec<String> = PARTITIONED
        .iter()
        .map(|t| partition_name(t, month))
        .collect();
    sqlx::raw_sql(&format!(
        "LOCK TABLE {} IN SHARE MODE",
        parts
            .iter()
            .map(|p| quote_ident(p))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .execute(&mut *tx)
    .await?;

    let dir = archive_dir(prefix, month);
    let tmp = tempfile::tempdir()?;
    let mut files = Vec::new();
    // The runs rows of the month's runs (kept in the database too; archived so that the
    // archive is complete on its own).
    let run_cols = columns(&mut tx, "runs").await?;
    let mut exports = vec![(
        "runs".to_string(),
        run_cols.clone(),
        format!(
            "COPY (SELECT {} FROM runs WHERE id IN (SELECT run_id FROM {})) TO STDOUT",
            column_list(&run_cols),
            quote_ident(&perf_part)
        ),
    )];
    for (table, part) in PARTITIONED.iter().zip(&parts) {
        let cols = columns(&mut tx, table).await?;
        let sql = format!(
            "COPY {} ({}) TO STDOUT",
            quote_ident(part),
            column_list(&cols)
        );
        exports.push((table.to_string(), cols, sql));
    }
    for (table, cols, sql) in exports {
        let path = tmp.path().join(format!("{table}.tsv.gz"));
        let (rows, bytes, sha256) = export_to_file(&mut tx, &sql, &path).await?;
        files.push((
            path,
            ArchivedFile {
                key: format!("{dir}{table}.tsv.gz"),
                table,
                columns: cols,
                rows,
                bytes,
                sha256,
            },
        ));
    }
    checkpoint("exported");

    for (path, f) in &files {
        store
            .upload_file(path, &f.key, "application/gzip")
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        month: label.clone(),
        schema_version: schema_version(&mut tx).await?,
        created_at: Utc::now(),
        files: files.iter().map(|(_, f)| f.clone()).collect(),
    };
    let manifest_bytes = serde_json::to_vec_pretty(&manifest)?;
    let manifest_sha = hex::encode(Sha256::digest(&manifest_bytes));
    let manifest_key = format!("{dir}manifest.json");
    store
        .upload_bytes(manifest_bytes, &manifest_key, "application/json")
        .await
        .map_err(|e| anyhow!("{e}"))?;
    checkpoint("uploaded");

    // Read everything back before anything is dropped.
    for (_, f) in &files {
        let (bytes, sha, rows) = read_back_raw_or_gz(store, &f.key, true).await?;
        if bytes != f.bytes || sha != f.sha256 || rows != f.rows {
            bail!(
                "verification of {} failed: read {bytes} bytes, sha256 {sha}, {rows} rows; \
                 wrote {} bytes, sha256 {}, {} rows",
                f.key,
                f.bytes,
                f.sha256,
                f.rows
            );
        }
    }
    let (_, sha, _) = read_back_raw_or_gz(store, &manifest_key, false).await?;
    if sha != manifest_sha {
        bail!("verification of {manifest_key} failed: sha256 {sha}, wrote {manifest_sha}");
    }
    checkpoint("verified");

    sqlx::query(&format!(
        "UPDATE runs SET k6_archived_month = $1 WHERE id IN (SELECT run_id FROM {})",
        quote_ident(&perf_part)
    ))
    .persistent(false)
    .bind(month)
    .execute(&mut *tx)
    .await?;
    let counts: serde_json::Map<String, serde_json::Value> = manifest
        .files
        .iter()
        .map(|f| (f.table.clone(), f.rows.into()))
        .collect();
    sqlx::query(
        "INSERT INTO k6_archived_months (month, manifest_uri, manifest_sha256, row_counts, schema_version) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .persistent(false)
    .bind(month)
    .bind(store.uri(&manifest_key))
    .bind(&manifest_sha)
    .bind(sqlx::types::Json(&counts))
    .bind(manifest.schema_version)
    .execute(&mut *tx)
    .await?;
    checkpoint("marked");

    // Detaching locks the parents (and, through the foreign keys, `runs`): take those
    // locks in the order a run's write takes them, so writes in flight finish first
    // instead of deadlocking with the archive. Readers wait only for the drop itself.
    sqlx::raw_sql(
        "LOCK TABLE runs IN SHARE ROW EXCLUSIVE MODE; \
         LOCK TABLE k6_performance_runs, k6_metrics_history, k6_threshold_results, \
         k6_check_results IN ACCESS EXCLUSIVE MODE",
    )
    .execute(&mut *tx)
    .await?;
    // Detail partitions first: their foreign keys point at the runs partition.
    for (table, part) in PARTITIONED.iter().zip(&parts).rev() {
        sqlx::raw_sql(&format!(
            "ALTER TABLE {} DETACH PARTITION {}; DROP TABLE {}",
            quote_ident(table),
            quote_ident(part),
            quote_ident(part)
        ))
        .execute(&mut *tx)
        .await?;
    }
    checkpoint("dropped");
    tx.commit().await?;
    Ok(MonthOutcome::Archived {
        manifest_key,
        rows: manifest.files.iter().map(|f| f.rows).sum(),
        bytes: manifest.files.iter().map(|f| f.bytes).sum(),
    })
}

async fn read_back_raw_or_gz(
    store: &ArtifactStore,
    key: &str,
    gz: bool,
) -> anyhow::Result<(u64, String, u64)> {
    if gz {
        return read_back(store, key).await;
    }
    let bytes = get_small(store, key).await?;
    Ok((bytes.len() as u64, hex::encode(Sha256::digest(&bytes)), 0))
}

async fn get_object(
    store: &ArtifactStore,
    key: &str,
) -> anyhow::Result<aws_sdk_s3::operation::get_object::GetObjectOutput> {
    store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(key)
        .send()
        .await
        .map_err(|e| anyhow!("GetObject {key}: {}", crate::s3::describe_sdk_error(&e)))
}

async fn get_small(store: &ArtifactStore, key: &str) -> anyhow::Result<Vec<u8>> {
    let out = get_object(store, key).await?;
    Ok(out
        .body
        .collect()
        .await
        .with_context(|| format!("reading {key}"))?
        .into_bytes()
        .to_vec())
}

/// What a restore loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Rows per table, `runs` counting only the rows that were missing.
    pub rows: Vec<(String, u64)>,
}

/// Brings an archived month back into its partitions; see the module documentation.
pub async fn restore_month(
    pool: &PgPool,
    store: &ArtifactStore,
    month: NaiveDate,
) -> anyhow::Result<Restored> {
    let label = month_label(month);
    let mut tx = pool.begin().await?;
    let Some((uri, manifest_sha)) = archived_row(&mut tx, month).await? else {
        bail!("month {label} is not archived (no row in k6_archived_months)");
    };
    let key = store
        .key_of(&uri)
        .ok_or_else(|| anyhow!("archive {uri} is not in bucket {}", store.bucket()))?
        .to_string();
    let bytes = get_small(store, &key).await?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != manifest_sha {
        bail!(
            "manifest {uri} changed since it was archived: sha256 {sha}, recorded {manifest_sha}"
        );
    }
    let manifest: Manifest =
        serde_json::from_slice(&bytes).with_context(|| format!("manifest {uri}"))?;
    if manifest.format != MANIFEST_FORMAT || manifest.month != label {
        bail!(
            "manifest {uri} is {} for {}, expected {MANIFEST_FORMAT} for {label}",
            manifest.format,
            manifest.month
        );
    }
    sqlx::query("SELECT k6_ensure_month($1)")
        .persistent(false)
        .bind(month)
        .execute(&mut *tx)
        .await?;
    let mut rows = Vec::new();
    // runs first (only rows that are missing: the rest stayed), then the referenced
    // k6_performance_runs, then the details.
    let order = std::iter::once("runs").chain(PARTITIONED);
    for table in order {
        let f = manifest
            .files
            .iter()
            .find(|f| f.table == table)
            .ok_or_else(|| anyhow!("manifest {uri} lists no file for {table}"))?;
        let n = if table == "runs" {
            sqlx::raw_sql("CREATE TEMPORARY TABLE k6_restore_runs (LIKE runs) ON COMMIT DROP")
                .execute(&mut *tx)
                .await?;
            load_file(&mut tx, store, f, "k6_restore_runs").await?;
            let cols = column_list(&f.columns);
            sqlx::raw_sql(&format!(
                "INSERT INTO runs ({cols}) SELECT {cols} FROM k6_restore_runs ON CONFLICT (id) DO NOTHING"
            ))
            .execute(&mut *tx)
            .await?
            .rows_affected()
        } else {
            load_file(&mut tx, store, f, table).await?
        };
        rows.push((table.to_string(), n));
    }
    sqlx::query("UPDATE runs SET k6_archived_month = NULL WHERE k6_archived_month = $1")
        .persistent(false)
        .bind(month)
        .execute(&mut *tx)
        .await?;
    sqlx::query("DELETE FROM k6_archived_months WHERE month = $1")
        .persistent(false)
        .bind(month)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Restored { rows })
}

/// Loads one archived file into `COPY target FROM STDIN`, checking its SHA-256 and row
/// count against the manifest. The compressed file is staged on disk and its checksum
/// checked BEFORE the COPY starts: nothing is loaded from a changed file, and no COPY is
/// aborted halfway for it (an aborted COPY leaves its connection for the pool to clean up).
async fn load_file(
    tx: &mut Transaction<'_, Postgres>,
    store: &ArtifactStore,
    f: &ArchivedFile,
    target: &str,
) -> anyhow::Result<u64> {
    let staged = stage_verified(store, f).await?;
    let mut copy = tx
        .copy_in_raw(&format!(
            "COPY {} ({}) FROM STDIN",
            quote_ident(target),
            column_list(&f.columns)
        ))
        .await?;
    if let Err(e) = feed_copy(&staged, &mut copy).await {
        copy.abort(e.to_string()).await.ok();
        return Err(e);
    }
    let n = copy.finish().await?;
    if n != f.rows {
        bail!("{}: loaded {n} rows, manifest says {}", f.key, f.rows);
    }
    Ok(n)
}

/// Downloads an archived file into a temporary file (streamed, never whole in memory)
/// and checks its SHA-256 against the manifest.
async fn stage_verified(
    store: &ArtifactStore,
    f: &ArchivedFile,
) -> anyhow::Result<tempfile::TempPath> {
    use tokio::io::AsyncWriteExt as _;
    let out = store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(&f.key)
        .send()
        .await
        .map_err(|e| anyhow!("GetObject {}: {}", f.key, crate::s3::describe_sdk_error(&e)))?;
    let temp = tempfile::Builder::new()
        .prefix("k6-ingest-restore-")
        .tempfile()?
        .into_temp_path();
    let mut file = tokio::fs::File::create(&temp).await?;
    let mut body = out.body;
    let mut hasher = Sha256::new();
    while let Some(chunk) = body
        .try_next()
        .await
        .with_context(|| format!("reading {}", f.key))?
    {
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    let sha = hex::encode(hasher.finalize());
    if sha != f.sha256 {
        bail!("{}: sha256 {sha}, manifest says {}", f.key, f.sha256);
    }
    Ok(temp)
}

/// Gunzips a staged file into the COPY, a buffer at a time.
async fn feed_copy(
    path: &Path,
    copy: &mut sqlx::postgres::PgCopyIn<&mut PgConnection>,
) -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt as _;
    let mut file = tokio::fs::File::open(path).await?;
    let mut gunzip = GzDecoder::new(Vec::new());
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = file.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        gunzip.write_all(&buf[..n])?;
        let out = std::mem::take(gunzip.get_mut());
        if !out.is_empty() {
            copy.send(out).await?;
        }
    }
    let rest = gunzip.finish()?;
    if !rest.is_empty() {
        copy.send(rest).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_names() {
        let m = parse_month("2026-03").unwrap();
        assert_eq!(m, NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
        assert_eq!(
            partition_name("k6_check_results", m),
            "k6_check_results_y2026m03"
        );
        assert!(parse_month("2026-3").is_err());
        assert!(parse_month("2026-13").is_err());
        assert!(parse_date("2026-02-30").is_err());
        assert_eq!(archive_dir("", m), "archive/2026-03/");
        assert_eq!(archive_dir("k6/", m), "k6/archive/2026-03/");
        // Whole months only: a month is archived when it ends on or before the date.
        let before = parse_date("2026-04-01").unwrap();
        assert!(next_month(m) <= before);
        assert!(next_month(parse_month("2026-04").unwrap()) > before);
        // Three hot months on 30 November: August to November stay, July goes.
        let now = chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 11, 30, 23, 0, 0).unwrap();
        let start = hot_months_start(now, 3).unwrap();
        assert_eq!(start, parse_date("2026-08-01").unwrap());
        assert!(next_month(parse_month("2026-07").unwrap()) <= start);
        assert!(next_month(parse_month("2026-08").unwrap()) > start);
    }
}
