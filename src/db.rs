//! Migrations and the one write path: everything a run produces is stored in one
//! transaction, keyed by `run_id`, so a run is written once however often it arrives.

use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, QueryBuilder, Row, Transaction};
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::message::RunCompleted;
use crate::summary::Extraction;

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
}

impl StoreError {
    /// Connection trouble, pool exhaustion, serialization failures and deadlocks may pass.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::TenantMismatch { .. } => false,
            Self::Db(e) => is_transient_db(e),
        }
    }
}

pub fn is_transient_db(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            // 40001 serialization_failure, 40P01 deadlock, 08* connection, 57P0* shutdown,
            // 53* insufficient resources.
            let code = db.code().unwrap_or_default();
            code == "40001"
                || code == "40P01"
                || code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
        }
        _ => false,
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

pub async fn existing(pool: &PgPool, run_id: Uuid) -> Result<Existing, sqlx::Error> {
    let tenant = sqlx::query("SELECT organization_id, project_id FROM runs WHERE id = $1")
        .bind(run_id)
        .fetch_optional(pool)
        .await?
        .map(|r| (r.get::<Uuid, _>(0), r.get::<Uuid, _>(1)));
    let performance_has_summary = sqlx::query_scalar::<_, bool>(
        "SELECT summary_format IS NOT NULL FROM k6_performance_runs WHERE run_id = $1",
    )
    .bind(run_id)
    .fetch_optional(pool)
    .await?;
    Ok(Existing {
        tenant,
        performance_has_summary,
    })
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

/// Writes the run in one transaction: upsert `runs`, insert `k6_performance_runs` and
/// its detail rows. Nothing is written twice; a tenant mismatch writes nothing.
pub async fn store_run(pool: &PgPool, new: &NewRun<'_>) -> Result<Stored, StoreError> {
    let mut tx = pool.begin().await?;
    let msg = new.msg;
    let tenant =
        sqlx::query("SELECT organization_id, project_id FROM runs WHERE id = $1 FOR UPDATE")
            .bind(msg.run_id)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| (r.get::<Uuid, _>(0), r.get::<Uuid, _>(1)));
    let prior = sqlx::query("SELECT id, summary_format IS NOT NULL FROM k6_performance_runs WHERE run_id = $1 FOR UPDATE")
        .bind(msg.run_id)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| (r.get::<Uuid, _>(0), r.get::<bool, _>(1)));
    let existing = Existing {
        tenant,
        performance_has_summary: prior.map(|p| p.1),
    };
    existing.check_tenant(msg)?;
    if existing.is_final(new.has_summary) {
        tx.rollback().await?;
        return Ok(Stored::AlreadyPresent);
    }
    let replaced = if let Some((old_id, _)) = prior {
        sqlx::query("DELETE FROM k6_performance_runs WHERE id = $1")
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        true
    } else {
        false
    };

    upsert_run(&mut tx, new).await?;
    let k6_run_id = Uuid::now_v7();
    let inserted = insert_performance(&mut tx, new, k6_run_id).await?;
    if !inserted {
        // A concurrent ingest of the same run committed first.
        tx.rollback().await?;
        return Ok(Stored::AlreadyPresent);
    }
    insert_metrics(&mut tx, new, k6_run_id).await?;
    insert_thresholds(&mut tx, new, k6_run_id).await?;
    insert_checks(&mut tx, new, k6_run_id).await?;
    tx.commit().await?;
    Ok(if replaced {
        Stored::Replaced { k6_run_id }
    } else {
        Stored::Inserted { k6_run_id }
    })
}

async fn upsert_run(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewRun<'_>,
) -> Result<(), sqlx::Error> {
    let msg = new.msg;
    let c = &new.extraction.columns;
    sqlx::query(
        "INSERT INTO runs (id, job_id, test_id, organization_id, project_id, status, duration_ms, started_at, \
             completed_at, artifact_paths, logs_s3_url, error_details, trigger, location, metadata) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
         ON CONFLICT (id) DO UPDATE SET \
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
    .bind(msg.run_id)
    .bind(msg.job_id)
    .bind(msg.test_id)
    .bind(msg.organization_id)
    .bind(msg.project_id)
    .bind(c.status.as_str())
    .bind(new.duration_ms)
    .bind(msg.started_at)
    .bind(msg.completed_at)
    .bind(Json(&new.artifact_paths))
    .bind(&new.logs_s3_url)
    .bind(&new.extraction.status_details)
    .bind(msg.trigger.map(|t| t.as_str()))
    .bind(&msg.location)
    .bind(Json(msg.metadata.clone().filter(Value::is_object).unwrap_or_else(|| Value::Object(Default::default()))))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn insert_performance(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewRun<'_>,
    id: Uuid,
) -> Result<bool, sqlx::Error> {
    let msg = new.msg;
    let c = &new.extraction.columns;
    let row = sqlx::query(
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
         ON CONFLICT (run_id) DO NOTHING RETURNING id",
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
    tx: &mut Transaction<'_, Postgres>,
    new: &NewRun<'_>,
    k6_run_id: Uuid,
) -> Result<(), sqlx::Error> {
    let recorded_at = new.msg.completed_at.unwrap_or(new.msg.started_at);
    for chunk in new.extraction.metrics.chunks(ROWS_PER_INSERT) {
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, metric_type, contains, tags, \
             scale, value, count, rate, rate_scale, passes, fails, min_value, max_value, avg_value, med_value, \
             p90_value, p95_value, p99_value, percentiles, raw_values, sources, warnings, recorded_at) ",
        );
        qb.push_values(chunk, |mut b, m| {
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
                .push_bind(recorded_at);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

async fn insert_thresholds(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewRun<'_>,
    k6_run_id: Uuid,
) -> Result<(), sqlx::Error> {
    for chunk in new.extraction.thresholds.chunks(ROWS_PER_INSERT) {
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, base_name, tags, expression, ok, \
             aggregation, observed_value, observed_scale, observed_raw, observed_source) ",
        );
        qb.push_values(chunk, |mut b, t| {
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
                .push_bind(t.observed_source);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}

async fn insert_checks(
    tx: &mut Transaction<'_, Postgres>,
    new: &NewRun<'_>,
    k6_run_id: Uuid,
) -> Result<(), sqlx::Error> {
    for chunk in new.extraction.checks.chunks(ROWS_PER_INSERT) {
        let mut qb = QueryBuilder::<Postgres>::new(
            "INSERT INTO k6_check_results (id, k6_run_id, position, group_path, path, name, passes, fails) ",
        );
        qb.push_values(chunk, |mut b, c| {
            b.push_bind(Uuid::now_v7())
                .push_bind(k6_run_id)
                .push_bind(c.position)
                .push_bind(&c.group_path)
                .push_bind(&c.path)
                .push_bind(&c.name)
                .push_bind(c.passes)
                .push_bind(c.fails);
        });
        qb.build().execute(&mut **tx).await?;
    }
    Ok(())
}
