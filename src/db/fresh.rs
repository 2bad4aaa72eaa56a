//! A new run's whole write as one statement: the common case (a run arriving for the
//! first time) costs one round trip instead of a transaction of seven.

use sqlx::types::Json;
use uuid::Uuid;

use super::{Db, NewRun, RunValues, Stored, new_ids};
use crate::summary::extract::MetricRow;

impl Db {
    /// Writes the run if its `runs` row does not exist yet: the `runs` row, the
    /// k6_performance_runs row and every detail row in one statement (data-modifying
    /// CTEs, each insert fed by the one before, so nothing is written unless the `runs`
    /// row was new; foreign keys are checked at the end of the statement, when all rows
    /// are there). A statement is atomic, so this needs no transaction of its own
    /// unless a pooler forces one (see [`Db`]).
    ///
    /// `None` when it wrote nothing: the run exists (a redelivery, a replacement, a
    /// tenant to check) or PostgreSQL refused the statement. The caller then takes the
    /// step-by-step path, which checks the tenant under a lock and names the table a
    /// refusal came from: that path's outcome is the run's, this one only saves the
    /// round trips when nothing needs deciding. Connection trouble is returned as such.
    ///
    /// Its arguments repeat those of `insert_performance` and the three detail inserts:
    /// `checked!` takes a statement's arguments as one list, and those per-table
    /// statements stay because a refusal must name the table it came from.
    pub(super) async fn store_fresh(
        &self,
        new: &NewRun<'_>,
    ) -> Result<Option<Stored>, sqlx::Error> {
        let k6_run_id = Uuid::now_v7();
        let written = if self.prepared {
            self.insert_fresh(new, k6_run_id, self.pool()).await
        } else {
            let mut tx = self.pool().begin().await?;
            match self.insert_fresh(new, k6_run_id, &mut *tx).await {
                Ok(true) => tx.commit().await.map(|()| true),
                other => {
                    tx.rollback().await?;
                    other
                }
            }
        };
        match written {
            Ok(true) => Ok(Some(Stored::Inserted { k6_run_id })),
            Ok(false) => Ok(None),
            Err(sqlx::Error::Database(_) | sqlx::Error::Encode(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The statement of [`Db::store_fresh`]; whether it wrote the run.
    async fn insert_fresh<'e>(
        &self,
        new: &NewRun<'_>,
        k6_run_id: Uuid,
        on: impl sqlx::PgExecutor<'e>,
    ) -> Result<bool, sqlx::Error> {
        let (msg, c) = (new.msg, &new.extraction.columns);
        let run = RunValues::of(new);
        let metadata = run.metadata_of(msg);
        let (m, t, k) = (
            &new.extraction.metrics,
            &new.extraction.thresholds,
            &new.extraction.checks,
        );
        let col = |f: fn(&MetricRow) -> Option<i64>| m.iter().map(f).collect::<Vec<_>>();
        let row = checked!(
            self,
            "WITH r AS (INSERT INTO runs (id, job_id, test_id, organization_id, project_id, status, \
             duration_ms, started_at, completed_at, artifact_paths, logs_s3_url, error_details, trigger, \
             location, metadata) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) ON \
             CONFLICT (id) DO NOTHING RETURNING id), p AS (INSERT INTO k6_performance_runs (id, run_id, \
             test_id, organization_id, project_id, location, status, started_at, completed_at, duration_ms, \
             total_requests, failed_requests, request_rate, avg_response_time_ms, p50_response_time_ms, \
             p90_response_time_ms, p95_response_time_ms, p99_response_time_ms, min_response_time_ms, \
             max_response_time_ms, thresholds_passed, thresholds_total, thresholds_failed, checks_total, \
             checks_passed, checks_failed, vus_max, iterations_total, iterations_rate, data_received_bytes, \
             data_sent_bytes, exit_code, k6_version, summary_format, value_sources, warnings, summary_json, \
             summary_s3_url, config_snapshot) SELECT $16, $1, $3, $4, $5, COALESCE($14, 'us-east'), $6, $8, \
             $9, $7, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, \
             $34, $35, $36, $37, $38, $39, $40, $41, $42, $43, $44, $45 FROM r ON CONFLICT DO NOTHING \
             RETURNING id), m AS (INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, \
             metric_type, contains, tags, scale, value, count, rate, rate_scale, passes, fails, min_value, \
             max_value, avg_value, med_value, p90_value, p95_value, p99_value, percentiles, raw_values, \
             sources, warnings, recorded_at, started_at) SELECT t.id, p.id, t.metric_name, t.base_name, \
             t.metric_type, t.contains, t.tags, t.scale, t.value, t.count, t.rate, t.rate_scale, t.passes, \
             t.fails, t.min_value, t.max_value, t.avg_value, t.med_value, t.p90_value, t.p95_value, \
             t.p99_value, t.percentiles, t.raw_values, t.sources, t.warnings, $47, $8 FROM p, \
             UNNEST($46::uuid[], $48::text[], $49::text[], $50::text[], $51::text[], $52::jsonb[], \
             $53::int4[], $54::int8[], $55::int8[], $56::int8[], $57::int4[], $58::int8[], $59::int8[], \
             $60::int8[], $61::int8[], $62::int8[], $63::int8[], $64::int8[], $65::int8[], $66::int8[], \
             $67::jsonb[], $68::jsonb[], $69::jsonb[], $70::jsonb[]) AS t(id, metric_name, base_name, \
             metric_type, contains, tags, scale, value, count, rate, rate_scale, passes, fails, min_value, \
             max_value, avg_value, med_value, p90_value, p95_value, p99_value, percentiles, raw_values, \
             sources, warnings)), th AS (INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, \
             base_name, tags, expression, ok, aggregation, observed_value, observed_scale, observed_raw, \
             observed_source, started_at) SELECT t.id, p.id, t.metric_name, t.base_name, t.tags, \
             t.expression, t.ok, t.aggregation, t.observed_value, t.observed_scale, t.observed_raw, \
             t.observed_source, $8 FROM p, UNNEST($71::uuid[], $72::text[], $73::text[], $74::jsonb[], \
             $75::text[], $76::bool[], $77::text[], $78::int8[], $79::int4[], $80::float8[], $81::text[]) AS \
             t(id, metric_name, base_name, tags, expression, ok, aggregation, observed_value, observed_scale, \
             observed_raw, observed_source)), c AS (INSERT INTO k6_check_results (id, k6_run_id, position, \
             group_path, path, name, passes, fails, started_at) SELECT t.id, p.id, t.position, ARRAY(SELECT \
             g.v FROM jsonb_array_elements_text(t.group_path) WITH ORDINALITY AS g(v, n) ORDER BY g.n), \
             t.path, t.name, t.passes, t.fails, $8 FROM p, UNNEST($82::uuid[], $83::int4[], $84::jsonb[], \
             $85::text[], $86::text[], $87::int8[], $88::int8[]) AS t(id, position, group_path, path, name, \
             passes, fails)) SELECT EXISTS (SELECT 1 FROM p) AS \"stored!\"",
            msg.run_id,
            msg.job_id,
            msg.test_id,
            msg.organization_id,
            msg.project_id,
            run.status,
            run.duration_ms,
            msg.started_at,
            msg.completed_at,
            _ Json(run.artifact_paths),
            run.logs_s3_url,
            run.error_details,
            msg.trigger.map(|t| t.as_str()),
            msg.location.as_deref(),
            _ Json(&metadata),
            k6_run_id,
            c.total_requests,
            c.failed_requests,
            c.request_rate,
            c.avg_response_time_ms,
            c.p50_response_time_ms,
            c.p90_response_time_ms,
            c.p95_response_time_ms,
            c.p99_response_time_ms,
            c.min_response_time_ms,
            c.max_response_time_ms,
            c.thresholds_passed,
            c.thresholds_total,
            c.thresholds_failed,
            c.checks_total,
            c.checks_passed,
            c.checks_failed,
            c.vus_max,
            c.iterations_total,
            c.iterations_rate,
            c.data_received_bytes,
            c.data_sent_bytes,
            c.exit_code,
            msg.k6_version.as_deref(),
            c.summary_format,
            _ Json(&c.value_sources),
            _ Json(&c.warnings),
            _ new.summary_json.as_ref().map(Json),
            new.summary_s3_url.as_deref(),
            _ msg.config_snapshot.as_ref().map(Json),
            _ new_ids(m.len()),
            msg.completed_at.unwrap_or(msg.started_at),
            _ m.iter().map(|m| m.metric_name.as_str()).collect::<Vec<_>>(),
            _ m.iter().map(|m| m.base_name.as_str()).collect::<Vec<_>>(),
            _ m.iter().map(|m| m.metric_type).collect::<Vec<_>>(),
            _ m.iter().map(|m| m.contains).collect::<Vec<_>>(),
            _ m.iter().map(|m| Json(&m.tags)).collect::<Vec<_>>(),
            _ m.iter().map(|m| m.scale).collect::<Vec<_>>(),
            _ col(|m| m.value),
            _ col(|m| m.count),
            _ col(|m| m.rate),
            _ m.iter().map(|m| m.rate_scale).collect::<Vec<_>>(),
            _ col(|m| m.passes),
            _ col(|m| m.fails),
            _ col(|m| m.min_value),
            _ col(|m| m.max_value),
            _ col(|m| m.avg_value),
            _ col(|m| m.med_value),
            _ col(|m| m.p90_value),
            _ col(|m| m.p95_value),
            _ col(|m| m.p99_value),
            _ m.iter().map(|m| Json(&m.percentiles)).collect::<Vec<_>>(),
            _ m.iter().map(|m| Json(&m.raw_values)).collect::<Vec<_>>(),
            _ m.iter().map(|m| Json(&m.sources)).collect::<Vec<_>>(),
            _ m.iter().map(|m| Json(&m.warnings)).collect::<Vec<_>>(),
            _ new_ids(t.len()),
            _ t.iter().map(|t| t.metric_name.as_str()).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.base_name.as_str()).collect::<Vec<_>>(),
            _ t.iter().map(|t| Json(&t.tags)).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.expression.as_str()).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.ok).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.aggregation.as_deref()).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.observed_value).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.observed_scale).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.observed_raw).collect::<Vec<_>>(),
            _ t.iter().map(|t| t.observed_source).collect::<Vec<_>>(),
            _ new_ids(k.len()),
            _ k.iter().map(|c| c.position).collect::<Vec<_>>(),
            _ k.iter().map(|c| Json(&c.group_path)).collect::<Vec<_>>(),
            _ k.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
            _ k.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            _ k.iter().map(|c| c.passes).collect::<Vec<_>>(),
            _ k.iter().map(|c| c.fails).collect::<Vec<_>>(),
        )
        .fetch_one(on)
        .await?;
        Ok(sqlx::Row::get::<bool, _>(&row, 0))
    }
}
