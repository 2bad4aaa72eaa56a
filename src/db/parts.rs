//! Runs split across runners (SPEC section 12): each runner's part in `k6_run_parts`,
//! and the merged run written in the transaction of the part that completes it.
//!
//! Every part transaction first creates the `runs` row if needed and locks it
//! (`SELECT … FOR UPDATE`), so parts of one run are stored one after another: of two
//! "last parts" committing at once, the second sees the first's part and merge, and
//! nothing is merged twice.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use super::{Db, Existing, NewRun, RunValues, StoreError, Stored};
use crate::message::{Part, RunCompleted};

/// The key in `k6_performance_runs.value_sources` that marks a merged row: `"3 of 4"`.
pub const MERGED_PARTS_KEY: &str = "merged_parts";

/// One part as the worker stores it.
pub struct NewPart<'a> {
    pub msg: &'a RunCompleted,
    pub part: &'a Part,
    pub status: &'a str,
    pub columns: Value,
    pub artifact_paths: Value,
    pub summary_json: Option<Value>,
    pub summary_s3_url: Option<String>,
    pub metrics_s3_url: Option<String>,
    pub error_details: Option<String>,
}

/// What [`Db::insert_part`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartWrite {
    Inserted,
    /// A stored part without a summary was replaced by this one, which has one.
    Replaced,
    /// Stored before; nothing written.
    Kept,
}

/// A stored part, as a merge reads it back.
#[derive(Debug, Clone)]
pub struct StoredPart {
    pub index: u32,
    pub count: u32,
    pub runner: Option<String>,
    pub execution_segment: Option<String>,
    pub exit_code: Option<i32>,
    pub status: String,
    pub artifact_paths: Value,
    /// The summary is inlined in `summary_json`; read with [`Db::part_summary_json`]
    /// when the merge needs it, never with every part at once.
    pub has_inline_summary: bool,
    pub summary_s3_url: Option<String>,
    pub metrics_s3_url: Option<String>,
    pub error_details: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub location: Option<String>,
    pub k6_version: Option<String>,
    pub config_snapshot: Option<Value>,
    pub metadata: Option<Value>,
}

/// What the locked run holds when a part arrives.
#[derive(Debug, Clone)]
pub struct PartState {
    pub parts: Vec<StoredPart>,
    /// `value_sources.merged_parts` of the run's `k6_performance_runs` row, if any.
    pub merged: Option<String>,
    /// A `k6_performance_runs` row exists (merged or not).
    pub has_performance_row: bool,
}

impl PartState {
    /// All `count` parts are stored and the run's row is not yet their merge.
    pub fn merge_due(&self, count: u32) -> bool {
        self.parts.len() as u32 == count
            && self.merged.as_deref() != Some(&merged_label(count, count))
    }
}

pub fn merged_label(have: u32, count: u32) -> String {
    format!("{have} of {count}")
}

impl Db {
    /// Opens a part's transaction: creates the `runs` row as `running` if the run is
    /// new, locks it, and checks the tenant.
    ///
    /// The month's partitions are made to exist first, in a short transaction of their
    /// own: the part's transaction may write the merged run, and a missing partition
    /// there would abort it after its lock and its part are in (a run's whole write is
    /// retried instead, see [`Db::store_run`]). Creating a partition cannot wait inside
    /// that transaction either: it needs the partitioned table to itself, which the
    /// transaction's own reads of it would keep it from.
    pub async fn begin_part(
        &self,
        msg: &RunCompleted,
    ) -> Result<Transaction<'static, Postgres>, StoreError> {
        self.ensure_month(msg.started_at).await?;
        let mut tx = self.pool.begin().await?;
        checked!(
            self,
            "INSERT INTO runs (id, job_id, test_id, organization_id, project_id, status, started_at, trigger, location) \
             VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, $8) ON CONFLICT (id) DO NOTHING",
            msg.run_id,
            msg.job_id,
            msg.test_id,
            msg.organization_id,
            msg.project_id,
            msg.started_at,
            msg.trigger.map(|t| t.as_str()),
            msg.location.as_deref(),
        )
        .execute(&mut *tx)
        .await
        .map_err(|e| StoreError::from_write("runs", e))?;
        let tenant = checked!(
            self,
            "SELECT organization_id, project_id FROM runs WHERE id = $1 FOR UPDATE",
            msg.run_id,
        )
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| (r.get::<Uuid, _>(0), r.get::<Uuid, _>(1)));
        Existing {
            tenant,
            performance_has_summary: None,
        }
        .check_tenant(msg)?;
        Ok(tx)
    }

    /// Whether the run's part `index` is stored, and if so whether with a summary.
    pub async fn part_stored(&self, run_id: Uuid, index: u32) -> Result<Option<bool>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = checked!(
            self,
            "SELECT summary_json IS NOT NULL OR summary_s3_url IS NOT NULL AS has_summary FROM k6_run_parts \
                 WHERE run_id = $1 AND part_index = $2",
            run_id,
            index as i32,
        )
        .fetch_optional(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(row.map(|r| r.get::<bool, _>(0)))
    }

    /// Stores the part unless it is stored already. A stored part without a summary (it
    /// was recorded as `error`) is replaced by one with a summary, as a whole run's
    /// error record is.
    pub async fn insert_part(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewPart<'_>,
    ) -> Result<PartWrite, StoreError> {
        let msg = new.msg;
        let row = checked!(
            self,
            "INSERT INTO k6_run_parts (id, run_id, part_index, part_count, runner, execution_segment, \
                     event_id, exit_code, status, columns, artifact_paths, summary_json, summary_s3_url, \
                     metrics_s3_url, error_details, started_at, completed_at, location, k6_version, \
                     config_snapshot, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, \
                     $20, $21) \
                 ON CONFLICT (run_id, part_index) DO UPDATE SET \
                     id = EXCLUDED.id, runner = EXCLUDED.runner, execution_segment = EXCLUDED.execution_segment, \
                     event_id = EXCLUDED.event_id, exit_code = EXCLUDED.exit_code, status = EXCLUDED.status, \
                     columns = EXCLUDED.columns, artifact_paths = EXCLUDED.artifact_paths, \
                     summary_json = EXCLUDED.summary_json, summary_s3_url = EXCLUDED.summary_s3_url, \
                     metrics_s3_url = EXCLUDED.metrics_s3_url, error_details = EXCLUDED.error_details, \
                     started_at = EXCLUDED.started_at, completed_at = EXCLUDED.completed_at, \
                     location = EXCLUDED.location, k6_version = EXCLUDED.k6_version, \
                     config_snapshot = EXCLUDED.config_snapshot, metadata = EXCLUDED.metadata, created_at = now() \
                 WHERE k6_run_parts.summary_json IS NULL AND k6_run_parts.summary_s3_url IS NULL \
                     AND (EXCLUDED.summary_json IS NOT NULL OR EXCLUDED.summary_s3_url IS NOT NULL) \
                 RETURNING (xmax = 0) AS inserted",
            Uuid::now_v7(),
            msg.run_id,
            new.part.index as i32,
            new.part.count as i32,
            new.part.runner.as_deref(),
            new.part.execution_segment.as_deref(),
            msg.event_id,
            msg.exit_code,
            new.status,
            _ Json(&new.columns),
            _ Json(&new.artifact_paths),
            _ new.summary_json.as_ref().map(Json),
            new.summary_s3_url.as_deref(),
            new.metrics_s3_url.as_deref(),
            new.error_details.as_deref(),
            msg.started_at,
            msg.completed_at,
            msg.location.as_deref(),
            msg.k6_version.as_deref(),
            _ msg.config_snapshot.as_ref().map(Json),
            _ msg.metadata.as_ref().map(Json),
        )
        .fetch_optional(&mut **tx)
        .await
        .map_err(|e| StoreError::from_write("k6_run_parts", e))?;
        Ok(match row {
            None => PartWrite::Kept,
            Some(r) if r.get::<bool, _>(0) => PartWrite::Inserted,
            Some(_) => PartWrite::Replaced,
        })
    }

    /// The run's stored parts (by index) and the state of its merged row.
    pub async fn part_state(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        run_id: Uuid,
    ) -> Result<PartState, sqlx::Error> {
        let rows = checked!(
            self,
            "SELECT part_index, part_count, runner, execution_segment, exit_code, status, artifact_paths, \
                     summary_json IS NOT NULL AS has_inline_summary, summary_s3_url, metrics_s3_url, error_details, started_at, completed_at, \
                     location, k6_version, config_snapshot, metadata \
                 FROM k6_run_parts WHERE run_id = $1 ORDER BY part_index",
            run_id,
        )
        .fetch_all(&mut **tx)
        .await?;
        let parts = rows
            .into_iter()
            .map(|r| StoredPart {
                index: r.get::<i32, _>(0) as u32,
                count: r.get::<i32, _>(1) as u32,
                runner: r.get(2),
                execution_segment: r.get(3),
                exit_code: r.get(4),
                status: r.get(5),
                artifact_paths: r.get::<Json<Value>, _>(6).0,
                has_inline_summary: r.get(7),
                summary_s3_url: r.get(8),
                metrics_s3_url: r.get(9),
                error_details: r.get(10),
                started_at: r.get(11),
                completed_at: r.get(12),
                location: r.get(13),
                k6_version: r.get(14),
                config_snapshot: r.get::<Option<Json<Value>>, _>(15).map(|j| j.0),
                metadata: r.get::<Option<Json<Value>>, _>(16).map(|j| j.0),
            })
            .collect();
        let perf = checked!(
            self,
            "SELECT value_sources ->> $2 AS merged FROM k6_performance_runs WHERE run_id = $1",
            run_id,
            MERGED_PARTS_KEY,
        )
        .fetch_optional(&mut **tx)
        .await?;
        Ok(PartState {
            parts,
            has_performance_row: perf.is_some(),
            merged: perf.and_then(|r| r.get::<Option<String>, _>(0)),
        })
    }

    /// One stored part's inline summary (`None` when it has none inline).
    pub async fn part_summary_json(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        run_id: Uuid,
        index: u32,
    ) -> Result<Option<Value>, sqlx::Error> {
        let row = checked!(
            self,
            "SELECT summary_json FROM k6_run_parts WHERE run_id = $1 AND part_index = $2",
            run_id,
            index as i32,
        )
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.and_then(|r| r.get::<Option<Json<Value>>, _>(0).map(|j| j.0)))
    }

    /// Writes the merged run (or the record of an incomplete one) in the part's
    /// transaction, replacing whatever `k6_performance_runs` row the run had.
    /// `summary_text` is the merged summary's inline document as JSON text: bound as
    /// text and cast by the server, so no JSON tree of a document up to
    /// `s3.inline_summary_max_bytes` is built in the worker.
    pub async fn write_merged(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        summary_text: Option<&str>,
    ) -> Result<Stored, StoreError> {
        let run_id = new.msg.run_id;
        let prior = checked!(
            self,
            "DELETE FROM k6_performance_runs WHERE run_id = $1 RETURNING id",
            run_id,
        )
        .fetch_optional(&mut **tx)
        .await?;
        let run = RunValues::of(new);
        self.upsert_run(tx, new.msg, &run)
            .await
            .map_err(|e| StoreError::from_write("runs", e))?;
        let k6_run_id = Uuid::now_v7();
        self.insert_performance(tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_performance_runs", e))?;
        if let Some(text) = summary_text {
            checked!(
                self,
                "UPDATE k6_performance_runs SET summary_json = $2::jsonb WHERE id = $1",
                k6_run_id,
                _ text,
            )
            .execute(&mut **tx)
            .await
            .map_err(|e| StoreError::from_write("k6_performance_runs", e))?;
        }
        self.insert_metrics(tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_metrics_history", e))?;
        self.insert_thresholds(tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_threshold_results", e))?;
        self.insert_checks(tx, new, k6_run_id)
            .await
            .map_err(|e| StoreError::from_write("k6_check_results", e))?;
        Ok(if prior.is_some() {
            Stored::Replaced { k6_run_id }
        } else {
            Stored::Inserted { k6_run_id }
        })
    }

    /// Runs with stored parts but not all of them, no `k6_performance_runs` row, and a
    /// first part older than `older_than`: the sweep records them as `error`.
    pub async fn overdue_split_runs(
        &self,
        older_than: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Uuid>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let rows = checked!(
            self,
            "SELECT p.run_id FROM k6_run_parts p \
                 WHERE NOT EXISTS (SELECT 1 FROM k6_performance_runs k WHERE k.run_id = p.run_id) \
                 GROUP BY p.run_id \
                 HAVING count(*) < max(p.part_count) AND min(p.created_at) < $1 \
                 ORDER BY min(p.created_at) LIMIT $2",
            older_than,
            limit,
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(rows.into_iter().map(|r| r.get::<Uuid, _>(0)).collect())
    }

    /// Locks a run for the sweep (no tenant to check: the run is read from the database).
    pub async fn begin_locked(
        &self,
        run_id: Uuid,
    ) -> Result<Option<(Transaction<'static, Postgres>, RunIdentity)>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = checked!(
            self,
            "SELECT job_id, test_id, organization_id, project_id, trigger, location, metadata \
                 FROM runs WHERE id = $1 FOR UPDATE",
            run_id,
        )
        .fetch_optional(&mut *tx)
        .await?;
        Ok(row.map(|r| {
            (
                tx,
                RunIdentity {
                    job_id: r.get(0),
                    test_id: r.get(1),
                    organization_id: r.get(2),
                    project_id: r.get(3),
                    trigger: r.get(4),
                    location: r.get(5),
                    metadata: r.get::<Json<Value>, _>(6).0,
                },
            )
        }))
    }
}

/// A run's identity as `runs` holds it.
#[derive(Debug, Clone)]
pub struct RunIdentity {
    pub job_id: Option<Uuid>,
    pub test_id: Option<Uuid>,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    pub trigger: Option<String>,
    pub location: Option<String>,
    pub metadata: Value,
}
