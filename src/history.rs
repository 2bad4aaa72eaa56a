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
//!
//! The statements are in [`crate::db::history`]; this module holds the steps, the files
//! and S3.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use chrono::{Datelike, Months, NaiveDate, Utc};
use flate2::Compression;
use flate2::write::{GzDecoder, GzEncoder};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool};

use crate::db::history as sql;
pub use crate::db::history::{PARTITIONED, partition_name};
use crate::s3::ArtifactStore;

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
        let made = sql::ensure_month(&mut tx, month).await?;
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
    let months = sql::partitioned_months(&mut tx).await?;
    tx.commit().await?;
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

/// Streams an export's `COPY ... TO STDOUT` through gzip into `path`: (rows, bytes,
/// sha256).
async fn export_to_file(
    conn: &mut PgConnection,
    export: &sql::Export,
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
    let mut stream = sql::copy_out(conn, export).await?;
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

/// Archives one month; see the module documentation for the steps and guarantees.
pub async fn archive_month(
    pool: &PgPool,
    store: &ArtifactStore,
    prefix: &str,
    month: NaiveDate,
) -> anyhow::Result<MonthOutcome> {
    let mut tx = pool.begin().await?;
    if !claim_month(&mut tx, month).await? {
        return Ok(MonthOutcome::AlreadyArchived);
    }
    let dir = archive_dir(prefix, month);
    let tmp = tempfile::tempdir()?;
    let files = export_month(&mut tx, month, &dir, tmp.path()).await?;
    checkpoint("exported");
    let up = upload_month(&mut tx, store, month, &dir, &files).await?;
    checkpoint("uploaded");
    verify_upload(store, &up).await?;
    checkpoint("verified");
    mark_archived(&mut tx, store, month, &up).await?;
    checkpoint("marked");
    sql::drop_month(&mut tx, month).await?;
    checkpoint("dropped");
    tx.commit().await?;
    Ok(MonthOutcome::Archived {
        rows: up.manifest.files.iter().map(|f| f.rows).sum(),
        bytes: up.manifest.files.iter().map(|f| f.bytes).sum(),
        manifest_key: up.manifest_key,
    })
}

/// Checks that the month is to be archived and locks its partitions against writes;
/// false if it was archived already.
async fn claim_month(conn: &mut PgConnection, month: NaiveDate) -> anyhow::Result<bool> {
    let label = month_label(month);
    let exists = sql::month_is_partitioned(conn, month).await?;
    match (exists, sql::archived_month(conn, month).await?) {
        (false, Some(_)) => return Ok(false),
        (false, None) => bail!("month {label} has no partitions"),
        (true, Some(archived)) => bail!(
            "month {label} was archived to {} and has rows again (runs stored since): \
             restore it first (`k6-ingest restore {label}`), then archive it",
            archived.manifest_uri
        ),
        (true, None) => {}
    }
    sql::lock_month_for_archive(conn, month).await?;
    Ok(true)
}

/// Writes the month's files into `tmp`, each with what the manifest will say of it.
async fn export_month(
    conn: &mut PgConnection,
    month: NaiveDate,
    dir: &str,
    tmp: &Path,
) -> anyhow::Result<Vec<(PathBuf, ArchivedFile)>> {
    let mut files = Vec::new();
    for export in sql::month_exports(conn, month).await? {
        let path = tmp.join(format!("{}.tsv.gz", export.table));
        let (rows, bytes, sha256) = export_to_file(conn, &export, &path).await?;
        files.push((
            path,
            ArchivedFile {
                key: format!("{dir}{}.tsv.gz", export.table),
                table: export.table,
                columns: export.columns,
                rows,
                bytes,
                sha256,
            },
        ));
    }
    Ok(files)
}

/// A month's archive once in S3: its manifest, where that is, and its SHA-256.
struct Uploaded {
    manifest: Manifest,
    manifest_key: String,
    manifest_sha: String,
}

/// Uploads the month's files, then their manifest.
async fn upload_month(
    conn: &mut PgConnection,
    store: &ArtifactStore,
    month: NaiveDate,
    dir: &str,
    files: &[(PathBuf, ArchivedFile)],
) -> anyhow::Result<Uploaded> {
    for (path, f) in files {
        store
            .upload_file(path, &f.key, "application/gzip")
            .await
            .map_err(|e| anyhow!("{e}"))?;
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        month: month_label(month),
        schema_version: sql::schema_version(conn).await?,
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
    Ok(Uploaded {
        manifest,
        manifest_key,
        manifest_sha,
    })
}

/// Reads everything back before anything is dropped.
async fn verify_upload(store: &ArtifactStore, up: &Uploaded) -> anyhow::Result<()> {
    for f in &up.manifest.files {
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
    let key = &up.manifest_key;
    let (_, sha, _) = read_back_raw_or_gz(store, key, false).await?;
    if sha != up.manifest_sha {
        bail!(
            "verification of {key} failed: sha256 {sha}, wrote {}",
            up.manifest_sha
        );
    }
    Ok(())
}

/// Marks the month's runs and records the month as archived.
async fn mark_archived(
    conn: &mut PgConnection,
    store: &ArtifactStore,
    month: NaiveDate,
    up: &Uploaded,
) -> anyhow::Result<()> {
    let row_counts: serde_json::Map<String, serde_json::Value> = up
        .manifest
        .files
        .iter()
        .map(|f| (f.table.clone(), f.rows.into()))
        .collect();
    let record = sql::ArchiveRecord {
        manifest_uri: &store.uri(&up.manifest_key),
        manifest_sha256: &up.manifest_sha,
        row_counts: &row_counts,
        schema_version: up.manifest.schema_version,
    };
    sql::mark_archived(conn, month, &record).await?;
    Ok(())
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
    let Some(archived) = sql::archived_month(&mut tx, month).await? else {
        bail!("month {label} is not archived (no row in k6_archived_months)");
    };
    let manifest = read_manifest(store, &archived, &label).await?;
    sql::ensure_month(&mut tx, month).await?;
    let rows = load_month(&mut tx, store, &manifest, &archived.manifest_uri).await?;
    sql::forget_archived(&mut tx, month).await?;
    tx.commit().await?;
    Ok(Restored { rows })
}

/// Reads an archived month's manifest, checked against the SHA-256 recorded at archive
/// time and against the month it is for.
async fn read_manifest(
    store: &ArtifactStore,
    archived: &sql::ArchivedMonth,
    label: &str,
) -> anyhow::Result<Manifest> {
    let uri = &archived.manifest_uri;
    let key = store
        .key_of(uri)
        .ok_or_else(|| anyhow!("archive {uri} is not in bucket {}", store.bucket()))?
        .to_string();
    let bytes = get_small(store, &key).await?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != archived.manifest_sha256 {
        bail!(
            "manifest {uri} changed since it was archived: sha256 {sha}, recorded {}",
            archived.manifest_sha256
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
    Ok(manifest)
}

/// Loads every file of the manifest; rows per table, `runs` counting only the rows that
/// were missing.
async fn load_month(
    conn: &mut PgConnection,
    store: &ArtifactStore,
    manifest: &Manifest,
    uri: &str,
) -> anyhow::Result<Vec<(String, u64)>> {
    let mut rows = Vec::new();
    // runs first (only rows that are missing: the rest stayed), then the referenced
    // k6_performance_runs, then the details.
    for table in std::iter::once("runs").chain(PARTITIONED) {
        let f = manifest
            .files
            .iter()
            .find(|f| f.table == table)
            .ok_or_else(|| anyhow!("manifest {uri} lists no file for {table}"))?;
        let n = if table == "runs" {
            let staging = sql::create_restore_runs(conn).await?;
            load_file(conn, store, f, staging).await?;
            sql::insert_missing_runs(conn, &f.columns).await?
        } else {
            load_file(conn, store, f, table).await?
        };
        rows.push((table.to_string(), n));
    }
    Ok(rows)
}

/// Loads one archived file into `COPY target FROM STDIN`, checking its SHA-256 and row
/// count against the manifest. The compressed file is staged on disk and its checksum
/// checked BEFORE the COPY starts: nothing is loaded from a changed file, and no COPY is
/// aborted halfway for it (an aborted COPY leaves its connection for the pool to clean up).
async fn load_file(
    conn: &mut PgConnection,
    store: &ArtifactStore,
    f: &ArchivedFile,
    target: &str,
) -> anyhow::Result<u64> {
    let staged = stage_verified(store, f).await?;
    let mut copy = sql::copy_in(conn, target, &f.columns).await?;
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
