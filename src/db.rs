//! Migrations and the one write path: everything a run produces is stored in one
//! transaction, keyed by `run_id`, so a run is written once however often it arrives.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, QueryBuilder, Row, Transaction};
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::ingest::RunLine;
use crate::message::RunCompleted;
use crate::summary::Extraction;

pub mod parts;

/// The embedded migrations (`migrations/`); `build.rs` makes new files trigger a rebuild.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

/// Postgres allows 65535 bind parameters per statement; detail rows go in chunks.
const ROWS_PER_INSERT: usize = 500;

pub async fn connect(s: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let url = s.url()?;
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid database.url: {e}"))?;
    let pool = PgPoolOptions::new()
        .max_connections(s.max_connections)
        .acquire_timeout(Duration::from_secs(s.acquire_timeout_secs))
        .connect_lazy_with(options.application_name("k6-ingest"));
    Ok(pool)
}

/// Every statement the worker sends goes through this: it knows whether named prepared
/// statements may be used (`database.prepared_statements`).
///
/// Without them (a transaction pooler such as PgBouncer 1.18), sqlx sends the unnamed
/// statement as Parse+Describe+Sync and then Bind+Execute+Sync: outside a transaction the
/// pooler may hand the second half to another server connection. So every statement with
/// parameters runs inside an explicit transaction (BEGIN goes as a simple query), and a
/// parameterless probe uses the simple protocol.
#[derive(Clone, Debug)]
pub struct Db {
    pool: PgPool,
    prepared: bool,
}

impl Db {
    pub fn new(pool: PgPool, prepared_statements: bool) -> Self {
        Self {
            pool,
            prepared: prepared_statements,
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn prepared_statements(&self) -> bool {
        self.prepared
    }

    fn query<'q>(&self, sql: &'q str) -> Query<'q, Postgres, PgArguments> {
        sqlx::query(sql).persistent(self.prepared)
    }

    /// Creates the partitions of the month of `at` (UTC) if they are missing
    /// (`k6_ensure_month`, in a short transaction of its own: creating a partition locks
    /// the parent table, which must not be held for a whole run's write).
    pub async fn ensure_month(&self, at: DateTime<Utc>) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        self.query("SELECT k6_ensure_month($1)")
            .bind(month_of(at))
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// A round trip that needs no prepared statement, for health checks.
    pub async fn probe(&self) -> Result<(), sqlx::Error> {
        probe(&self.pool).await
    }
}

/// The first day of `at`'s month in UTC: the partition a run of that time goes to.
pub fn month_of(at: DateTime<Utc>) -> NaiveDate {
    let d = at.date_naive();
    d.with_day(1).unwrap_or(d)
}

/// PostgreSQL found no partition for a row (SQLSTATE 23514, "no partition of relation
/// ... found for row"): the month's partitions were never created or were archived.
fn is_missing_partition(e: &StoreError) -> bool {
    let source = match e {
        StoreError::Refused { source, .. } => source,
        StoreError::Db(source) => source,
        StoreError::TenantMismatch { .. } => return false,
    };
    match source {
        sqlx::Error::Database(db) => {
            db.code().as_deref() == Some("23514") && db.message().starts_with("no partition of")
        }
        _ => false,
    }
}

/// `SELECT 1` over the simple query protocol: works directly and through any pooler.
pub async fn probe(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::raw_sql("SELECT 1").execute(pool).await.map(|_| ())
}

/// Applies the migrations over `migrate_url` if set (a direct connection: the migrator's
/// session-level advisory lock must not go through a transaction pooler), else `url`.
pub async fn migrate(s: &DatabaseSettings) -> anyhow::Result<Vec<i64>> {
    use secrecy::ExposeSecret;
    let url = match &s.migrate_url {
        Some(u) if !u.expose_secret().is_empty() => u.expose_secret().to_string(),
        _ => s.url()?.to_string(),
    };
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid database URL: {e}"))?;
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(s.acquire_timeout_secs))
        .connect_with(options.application_name("k6-ingest-migrate"))
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to PostgreSQL for migrations: {e}"))?;
    let before: Vec<i64> = applied_versions(&pool).await.unwrap_or_default();
    MIGRATOR.run(&pool).await?;
    let after = applied_versions(&pool).await?;
    pool.close().await;
    Ok(after.into_iter().filter(|v| !before.contains(v)).collect())
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "run {run_id} belongs to organization {existing_organization} / project {existing_project}; \
         the message says {organization} / {project}: refused"
    )]
    TenantMismatch {
        run_id: Uuid,
        existing_organization: Uuid,
        existing_project: Uuid,
        organization: Uuid,
        project: Uuid,
    },
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    /// PostgreSQL refused the run's content for good (a value too long or out of range,
    /// a check or unique violation, an index row too large...): retrying cannot help.
    #[error("the database refused the run's {step} rows: {}", refusal_reason(.source))]
    Refused {
        /// The table whose write was refused.
        step: &'static str,
        source: sqlx::Error,
    },
}

impl StoreError {
    /// A write of `step` failed: a refusal of what was sent (SQLSTATE class 22 data
    /// exception, 23 integrity constraint violation, 54 program limit exceeded) becomes
    /// [`StoreError::Refused`]; anything else (connection trouble, a statement the
    /// server does not know...) stays `Db`, so a fault of the setup is never recorded
    /// against the run.
    fn from_write(step: &'static str, e: sqlx::Error) -> Self {
        let refused = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|c| c.starts_with("22") || c.starts_with("23") || c.starts_with("54")),
            // A value sqlx itself could not encode came from the run's content too.
            sqlx::Error::Encode(_) => true,
            _ => false,
        };
        if refused {
            Self::Refused { step, source: e }
        } else {
            Self::Db(e)
        }
    }

    /// Whose fault this is: see [`db_fault`].
    pub fn fault(&self) -> crate::fault::Fault {
        match self {
            Self::TenantMismatch { .. } | Self::Refused { .. } => crate::fault::Fault::Permanent,
            Self::Db(e) => db_fault(e),
        }
    }
}

/// PostgreSQL's reason, with its SQLSTATE and the constraint it names, never the
/// refused value itself (the DETAIL line may quote it; it is left out), and bounded.
fn refusal_reason(e: &sqlx::Error) -> String {
    let mut out = match e {
        sqlx::Error::Database(db) => {
            let mut s = format!(
                "{} (SQLSTATE {})",
                db.message(),
                db.code().unwrap_or_default()
            );
            if let Some(c) = db.constraint() {
                s.push_str(&format!(", constraint {c}"));
            }
            s
        }
        other => other.to_string(),
    };
    if out.len() > 500 {
        let mut end = 500;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
}

/// Connection failures, pool timeouts, `08*` (connection exception), `57P*` (server
/// shutting down or restarting) and `53*` (out of connections or resources) say
/// PostgreSQL is unavailable to everyone; a serialization failure or deadlock (`40001`,
/// `40P01`) is this transaction's bad luck and costs an attempt; the rest is permanent.
pub fn db_fault(e: &sqlx::Error) -> crate::fault::Fault {
    use crate::fault::{Dependency, Fault};
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => Fault::Dependency(Dependency::Database),
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            if code.starts_with("08") || code.starts_with("57P") || code.starts_with("53") {
                Fault::Dependency(Dependency::Database)
            } else if code == "40001" || code == "40P01" {
                Fault::Transient
            } else {
                Fault::Permanent
            }
        }
        // The pool is closed only when the worker itself is stopping.
        sqlx::Error::PoolClosed => Fault::Transient,
        _ => Fault::Permanent,
    }
}

/// What is already stored for a run.
#[derive(Debug, Clone, Default)]
pub struct Existing {
    /// The `runs` row's organization and project.
    pub tenant: Option<(Uuid, Uuid)>,
    /// `Some(true)` when a `k6_performance_runs` row with a parsed summary exists,
    /// `Some(false)` when one exists without (a run recorded as `error`).
    pub performance_has_summary: Option<bool>,
}

impl Existing {
    /// The tenant check every write makes, usable before any artifact is touched.
    pub fn check_tenant(&self, msg: &RunCompleted) -> Result<(), StoreError> {
        match self.tenant {
            Some((org, project)) if org != msg.organization_id || project != msg.project_id => {
                Err(StoreError::TenantMismatch {
                    run_id: msg.run_id,
                    existing_organization: org,
                    existing_project: project,
                    organization: msg.organization_id,
                    project: msg.project_id,
                })
            }
            _ => Ok(()),
        }
    }

    /// A stored run is final unless it lacked a summary and this attempt has one: a
    /// dead-lettered run replayed after a fix then replaces its `error` record.
    pub fn is_final(&self, new_has_summary: bool) -> bool {
        match self.performance_has_summary {
            Some(had) => had || !new_has_summary,
            None => false,
        }
    }
}

/// Everything one run writes.
pub struct NewRun<'a> {
    pub msg: &'a RunCompleted,
    pub extraction: &'a Extraction,
    pub has_summary: bool,
    pub duration_ms: Option<i64>,
    pub artifact_paths: Value,
    pub logs_s3_url: Option<String>,
    pub summary_json: Option<Value>,
    pub summary_s3_url: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    Inserted {
        k6_run_id: Uuid,
    },
    /// An earlier record without a summary was replaced by one with a summary.
    Replaced {
        k6_run_id: Uuid,
    },
    AlreadyPresent,
}

/// Values the rows can refer to: every `s3://` URI in `runs.artifact_paths`, in
/// `runs.logs_s3_url` and in `k6_performance_runs.summary_s3_url` of a run.
fn collect_s3_uris(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if s.starts_with("s3://") => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|v| collect_s3_uris(v, out)),
        Value::Object(o) => o.values().for_each(|v| collect_s3_uris(v, out)),
        _ => {}
    }
}

/// The smallest record of a run whose content cannot be stored: status `error`, the
/// reason, and where its artifacts are; nothing taken from the refused content.
pub struct ErrorRecord<'a> {
    pub msg: &'a RunCompleted,
    pub reason: &'a str,
    pub artifact_paths: &'a Value,
    pub logs_s3_url: Option<&'a str>,
}

impl Db {
    /// What is stored for the run, read before any artifact is touched.
    pub async fn existing(&self, run_id: Uuid) -> Result<Existing, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let run = self
            .query(
                "SELECT organization_id, project_id, k6_archived_month IS NOT NULL FROM runs WHERE id = $1",
            )
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| ((r.get::<Uuid, _>(0), r.get::<Uuid, _>(1)), r.get::<bool, _>(2)));
        let tenant = run.map(|r| r.0);
        let performance_has_summary = if run.is_some_and(|r| r.1) {
            // Archived to S3: stored, and final (its month's partitions are gone).
            Some(true)
        } else {
            self.query(
                "SELECT summary_format IS NOT NULL FROM k6_performance_runs WHERE run_id = $1",
            )
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.get::<bool, _>(0))
        };
        tx.commit().await?;
        Ok(Existing {
            tenant,
            performance_has_summary,
        })
    }

    /// Every `s3://` URI a committed row of the run refers to. Objects listed here are
    /// never deleted: a concurrent duplicate that committed first refers to the same
    /// deterministic keys.
    pub async fn referenced_s3_uris(&self, run_id: Uuid) -> Result<Vec<String>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = self
            .query(
                "SELECT r.artifact_paths, r.logs_s3_url, p.summary_s3_url FROM runs r \
                 LEFT JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = $1",
            )
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        let mut out = Vec::new();
        if let Some(r) = row {
            let paths: Option<Json<Value>> = r.get(0);
            if let Some(Json(v)) = paths {
                collect_s3_uris(&v, &mut out);
            }
            out.extend(r.get::<Option<String>, _>(1));
            out.extend(r.get::<Option<String>, _>(2));
        }
        Ok(out)
    }

    /// Writes the run in one transaction: upsert `runs`, insert `k6_performance_runs`
    /// and its detail rows. Nothing is written twice; a tenant mismatch writes nothing.
    ///
    /// The month's partitions normally exist (`k6-ingest partitions` creates them
    /// ahead); a run of a month that has none (from 2019, from 2040, or a month archived
    /// since) has them created and is written again: a run never fails for lack of one.
    /// An archived run is "already present" before any partition is looked for.
    pub async fn store_run(&self, new: &NewRun<'_>) -> Result<Stored, StoreError> {
        match self.store_run_once(new).await {
            Err(e) if is_missing_partition(&e) => {
                self.ensure_month(new.msg.started_at).await?;
                self.store_run_once(new).await
            }
            other => other,
        }
    }

    async fn store_run_once(&self, new: &NewRun<'_>) -> Result<Stored, StoreError> {
        let mut tx = self.pool.begin().await?;
        let msg = new.msg;
        let c = &new.extraction.columns;
        let run = RunValues {
            status: c.status.as_str(),
            duration_ms: new.duration_ms,
            artifact_paths: &new.artifact_paths,
            logs_s3_url: new.logs_s3_url.as_deref(),
            error_details: new.extraction.status_details.as_deref(),
            metadata: true,
        };
        let Some(replaced) = self.lock_run(&mut tx, msg, &run, new.has_summary).await? else {
            tx.rollback().await?;
            return Ok(Stored::AlreadyPresent);
        };
        self.upsert_run(&mut tx, msg, &run)
            .await
            .map_err(|e| StoreError::from_write("runs", e))?;
        let k6_run_id = Uuid::now_v7();
        let inserted = self
            .insert_performance(&mut tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_performance_runs", e))?;
        if !inserted {
            // A concurrent ingest of the same run committed first.
            tx.rollback().await?;
            return Ok(Stored::AlreadyPresent);
        }
        self.insert_metrics(&mut tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_metrics_history", e))?;
        self.insert_thresholds(&mut tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_threshold_results", e))?;
        self.insert_checks(&mut tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_check_results", e))?;
        tx.commit().await?;
        Ok(if replaced {
            Stored::Replaced { k6_run_id }
        } else {
            Stored::Inserted { k6_run_id }
        })
    }

    /// Records a run whose content the database refused as `error`, in a transaction of
    /// its own, with the tenant check of every write. A stored run with a summary stays
    /// (`AlreadyPresent`); an earlier `error` record is replaced by this one.
    pub async fn store_error(&self, rec: &ErrorRecord<'_>) -> Result<Stored, StoreError> {
        match self.store_error_once(rec).await {
            Err(e) if is_missing_partition(&e) => {
                self.ensure_month(rec.msg.started_at).await?;
                self.store_error_once(rec).await
            }
            other => other,
        }
    }

    async fn store_error_once(&self, rec: &ErrorRecord<'_>) -> Result<Stored, StoreError> {
        let mut tx = self.pool.begin().await?;
        let msg = rec.msg;
        let run = RunValues {
            status: "error",
            duration_ms: msg.wall_duration_ms(),
            artifact_paths: rec.artifact_paths,
            logs_s3_url: rec.logs_s3_url,
            error_details: Some(rec.reason),
            metadata: false,
        };
        // `has_summary = true`: an earlier error record is replaced, a full one is kept.
        let Some(replaced) = self.lock_run(&mut tx, msg, &run, true).await? else {
            tx.rollback().await?;
            return Ok(Stored::AlreadyPresent);
        };
        self.upsert_run(&mut tx, msg, &run)
            .await
            .map_err(|e| StoreError::from_write("runs", e))?;
        let k6_run_id = Uuid::now_v7();
        let row = self
            .query(
                "INSERT INTO k6_performance_runs (id, run_id, test_id, organization_id, project_id, location, \
                     status, started_at, completed_at, duration_ms, exit_code, warnings) \
                 VALUES ($1, $2, $3, $4, $5, COALESCE($6, 'us-east'), 'error', $7, $8, $9, $10, $11) \
                 ON CONFLICT DO NOTHING RETURNING id",
            )
            .bind(k6_run_id)
            .bind(msg.run_id)
            .bind(msg.test_id)
            .bind(msg.organization_id)
            .bind(msg.project_id)
            .bind(&msg.location)
            .bind(msg.started_at)
            .bind(msg.completed_at)
            .bind(msg.wall_duration_ms())
            .bind(msg.exit_code)
            .bind(Json(vec![rec.reason]))
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| StoreError::from_write("k6_performance_runs", e))?;
        if row.is_none() {
            tx.rollback().await?;
            return Ok(Stored::AlreadyPresent);
        }
        tx.commit().await?;
        Ok(if replaced {
            Stored::Replaced { k6_run_id }
        } else {
            Stored::Inserted { k6_run_id }
        })
    }

    /// Locks the run's rows, checks the tenant, and clears an earlier record this write
    /// replaces. `None` when the stored record is final (nothing to write); else whether
    /// an earlier record was replaced.
    ///
    /// The `runs` row is the anchor: it is inserted (or found) and locked FIRST, so two
    /// concurrent writes of one run are serialised on it, and the second one then sees
    /// the first one's k6_performance_runs row, whatever month it went to (the unique
    /// key of the partitioned table includes `started_at`, so it could not settle this
    /// alone). The insert writes nothing over an existing row: the tenant is checked
    /// on the locked row before anything else is written.
    async fn lock_run(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
        has_summary: bool,
    ) -> Result<Option<bool>, StoreError> {
        self.insert_run_if_absent(tx, msg, run)
            .await
            .map_err(|e| StoreError::from_write("runs", e))?;
        let row = self
            .query(
                "SELECT organization_id, project_id, k6_archived_month IS NOT NULL FROM runs \
                 WHERE id = $1 FOR UPDATE",
            )
            .bind(msg.run_id)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| {
                (
                    (r.get::<Uuid, _>(0), r.get::<Uuid, _>(1)),
                    r.get::<bool, _>(2),
                )
            });
        let tenant = row.map(|r| r.0);
        if row.is_some_and(|r| r.1) {
            // Archived to S3 with its month: stored and final.
            let existing = Existing {
                tenant,
                performance_has_summary: Some(true),
            };
            existing.check_tenant(msg)?;
            return Ok(None);
        }
        let prior = self
            .query(
                "SELECT id, summary_format IS NOT NULL FROM k6_performance_runs \
                 WHERE run_id = $1 FOR UPDATE",
            )
            .bind(msg.run_id)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| (r.get::<Uuid, _>(0), r.get::<bool, _>(1)));
        let existing = Existing {
            tenant,
            performance_has_summary: prior.map(|p| p.1),
        };
        existing.check_tenant(msg)?;
        if existing.is_final(has_summary) {
            return Ok(None);
        }
        if let Some((old_id, _)) = prior {
            self.query("DELETE FROM k6_performance_runs WHERE id = $1")
                .bind(old_id)
                .execute(&mut **tx)
                .await?;
        }
        Ok(Some(prior.is_some()))
    }

    /// The headline numbers of a stored run.
    pub async fn stored_line(&self, run_id: Uuid) -> Result<RunLine, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = self
            .query(
                "SELECT status, p95_response_time_ms, request_rate, thresholds_total, thresholds_failed, \
                 checks_total, checks_passed FROM k6_performance_runs WHERE run_id = $1",
            )
            .bind(run_id)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.map_or_else(RunLine::default, |r| RunLine {
            status: r.get(0),
            p95_ms: r.get(1),
            request_rate: r.get(2),
            thresholds_total: r.get(3),
            thresholds_failed: r.get(4),
            checks_total: r.get(5),
            checks_passed: r.get(6),
        }))
    }
}

/// The `runs` columns a write sets besides the message's.
struct RunValues<'a> {
    status: &'a str,
    duration_ms: Option<i64>,
    artifact_paths: &'a Value,
    logs_s3_url: Option<&'a str>,
    error_details: Option<&'a str>,
    /// Merge the message's metadata (an error record leaves it out: it may be what
    /// was refused).
    metadata: bool,
}

impl Db {
    /// The `runs` row as [`Db::upsert_run`] would write it, only if there is none.
    async fn insert_run_if_absent(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
    ) -> Result<(), sqlx::Error> {
        self.write_runs_row(tx, msg, run, "ON CONFLICT (id) DO NOTHING")
            .await
    }

    /// The `runs` row, created or updated: the application may have created it when the
    /// run started, so what the message leaves out keeps the stored value.
    async fn upsert_run(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
    ) -> Result<(), sqlx::Error> {
        self.write_runs_row(
            tx,
            msg,
            run,
            "ON CONFLICT (id) DO UPDATE SET \
                 job_id = COALESCE(EXCLUDED.job_id, runs.job_id), \
                 test_id = COALESCE(EXCLUDED.test_id, runs.test_id), \
                 status = EXCLUDED.status, duration_ms = EXCLUDED.duration_ms, \
                 started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at, \
                 artifact_paths = EXCLUDED.artifact_paths, logs_s3_url = EXCLUDED.logs_s3_url, \
                 error_details = EXCLUDED.error_details, \
                 trigger = COALESCE(EXCLUDED.trigger, runs.trigger), \
                 location = COALESCE(EXCLUDED.location, runs.location), \
                 metadata = runs.metadata || EXCLUDED.metadata, \
                 updated_at = now()",
        )
        .await
    }

    /// One INSERT of the `runs` row with its values bound, ending in `on_conflict`.
    async fn write_runs_row(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
        on_conflict: &str,
    ) -> Result<(), sqlx::Error> {
        let metadata = msg
            .metadata
            .clone()
            .filter(|m| run.metadata && m.is_object())
            .unwrap_or_else(|| Value::Object(Default::default()));
        let sql = format!(
            "INSERT INTO runs (id, job_id, test_id, organization_id, project_id, status, duration_ms, started_at, \
                 completed_at, artifact_paths, logs_s3_url, error_details, trigger, location, metadata) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) {on_conflict}"
        );
        self.query(&sql)
            .bind(msg.run_id)
            .bind(msg.job_id)
            .bind(msg.test_id)
            .bind(msg.organization_id)
            .bind(msg.project_id)
            .bind(run.status)
            .bind(run.duration_ms)
            .bind(msg.started_at)
            .bind(msg.completed_at)
            .bind(Json(run.artifact_paths))
            .bind(run.logs_s3_url)
            .bind(run.error_details)
            .bind(msg.trigger.map(|t| t.as_str()))
            .bind(&msg.location)
            .bind(Json(metadata))
            .execute(&mut **tx)
            .await?;
        Ok(())
    }

    async fn insert_performance(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let msg = new.msg;
        let c = &new.extraction.columns;
        let row = self.query(
        "INSERT INTO k6_performance_runs (id, run_id, test_id, organization_id, project_id, location, status, \
             started_at, completed_at, duration_ms, total_requests, failed_requests, request_rate, \
             avg_response_time_ms, p50_response_time_ms, p90_response_time_ms, p95_response_time_ms, \
             p99_response_time_ms, min_response_time_ms, max_response_time_ms, thresholds_passed, \
             thresholds_total, thresholds_failed, checks_total, checks_passed, checks_failed, vus_max, \
             iterations_total, iterations_rate, data_received_bytes, data_sent_bytes, exit_code, k6_version, \
             summary_format, value_sources, warnings, summary_json, summary_s3_url, config_snapshot) \
         VALUES ($1, $2, $3, $4, $5, COALESCE($6, 'us-east'), $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, \
             $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37, \
             $38, $39) \
         ON CONFLICT DO NOTHING RETURNING id",
    )
    .bind(id)
    .bind(msg.run_id)
    .bind(msg.test_id)
    .bind(msg.organization_id)
    .bind(msg.project_id)
    .bind(&msg.location)
    .bind(c.status.as_str())
    .bind(msg.started_at)
    .bind(msg.completed_at)
    .bind(new.duration_ms)
    .bind(c.total_requests)
    .bind(c.failed_requests)
    .bind(c.request_rate)
    .bind(c.avg_response_time_ms)
    .bind(c.p50_response_time_ms)
    .bind(c.p90_response_time_ms)
    .bind(c.p95_response_time_ms)
    .bind(c.p99_response_time_ms)
    .bind(c.min_response_time_ms)
    .bind(c.max_response_time_ms)
    .bind(c.thresholds_passed)
    .bind(c.thresholds_total)
    .bind(c.thresholds_failed)
    .bind(c.checks_total)
    .bind(c.checks_passed)
    .bind(c.checks_failed)
    .bind(c.vus_max)
    .bind(c.iterations_total)
    .bind(c.iterations_rate)
    .bind(c.data_received_bytes)
    .bind(c.data_sent_bytes)
    .bind(c.exit_code)
    .bind(&msg.k6_version)
    .bind(c.summary_format)
    .bind(Json(&c.value_sources))
    .bind(Json(&c.warnings))
    .bind(new.summary_json.as_ref().map(Json))
    .bind(&new.summary_s3_url)
    .bind(msg.config_snapshot.as_ref().map(Json))
    .fetch_optional(&mut **tx)
    .await?;
        Ok(row.is_some())
    }

    async fn insert_metrics(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        k6_run_id: Uuid,
    ) -> Result<(), sqlx::Error> {
        let recorded_at = new.msg.completed_at.unwrap_or(new.msg.started_at);
        let head = "INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, metric_type, contains, tags, \
             scale, value, count, rate, rate_scale, passes, fails, min_value, max_value, avg_value, med_value, \
             p90_value, p95_value, p99_value, percentiles, raw_values, sources, warnings, recorded_at, started_at) ";
        self.insert_chunked(tx, head, &new.extraction.metrics, |b, m| {
            b.push_bind(Uuid::now_v7())
                .push_bind(k6_run_id)
                .push_bind(&m.metric_name)
                .push_bind(&m.base_name)
                .push_bind(m.metric_type)
                .push_bind(m.contains)
                .push_bind(Json(&m.tags))
                .push_bind(m.scale)
                .push_bind(m.value)
                .push_bind(m.count)
                .push_bind(m.rate)
                .push_bind(m.rate_scale)
                .push_bind(m.passes)
                .push_bind(m.fails)
                .push_bind(m.min_value)
                .push_bind(m.max_value)
                .push_bind(m.avg_value)
                .push_bind(m.med_value)
                .push_bind(m.p90_value)
                .push_bind(m.p95_value)
                .push_bind(m.p99_value)
                .push_bind(Json(&m.percentiles))
                .push_bind(Json(&m.raw_values))
                .push_bind(Json(&m.sources))
                .push_bind(Json(&m.warnings))
                .push_bind(recorded_at)
                .push_bind(new.msg.started_at);
        })
        .await
    }

    /// Inserts `rows` as multi-row INSERTs starting with `head`, in chunks: PostgreSQL
    /// binds at most 65535 parameters a statement.
    async fn insert_chunked<'r, T>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        head: &str,
        rows: &'r [T],
        bind: impl Fn(&mut sqlx::query_builder::Separated<'_, 'r, Postgres, &'static str>, &'r T),
    ) -> Result<(), sqlx::Error> {
        for chunk in rows.chunks(ROWS_PER_INSERT) {
            let mut qb = QueryBuilder::<Postgres>::new(head);
            qb.push_values(chunk, |mut b, row| bind(&mut b, row));
            qb.build()
                .persistent(self.prepared)
                .execute(&mut **tx)
                .await?;
        }
        Ok(())
    }

    async fn insert_thresholds(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        k6_run_id: Uuid,
    ) -> Result<(), sqlx::Error> {
        let head = "INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, base_name, tags, expression, ok, \
             aggregation, observed_value, observed_scale, observed_raw, observed_source, started_at) ";
        self.insert_chunked(tx, head, &new.extraction.thresholds, |b, t| {
            b.push_bind(Uuid::now_v7())
                .push_bind(k6_run_id)
                .push_bind(&t.metric_name)
                .push_bind(&t.base_name)
                .push_bind(Json(&t.tags))
                .push_bind(&t.expression)
                .push_bind(t.ok)
                .push_bind(&t.aggregation)
                .push_bind(t.observed_value)
                .push_bind(t.observed_scale)
                .push_bind(t.observed_raw)
                .push_bind(t.observed_source)
                .push_bind(new.msg.started_at);
        })
        .await
    }

    async fn insert_checks(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        k6_run_id: Uuid,
    ) -> Result<(), sqlx::Error> {
        let head = "INSERT INTO k6_check_results (id, k6_run_id, position, group_path, path, name, passes, fails, started_at) ";
        self.insert_chunked(tx, head, &new.extraction.checks, |b, c| {
            b.push_bind(Uuid::now_v7())
                .push_bind(k6_run_id)
                .push_bind(c.position)
                .push_bind(&c.group_path)
                .push_bind(&c.path)
                .push_bind(&c.name)
                .push_bind(c.passes)
                .push_bind(c.fails)
                .push_bind(new.msg.started_at);
        })
        .await
    }
}
