//! Migrations and the one write path: everything a run produces is stored in one
//! transaction, keyed by `run_id`, so a run is written once however often it arrives.
//!
//! Every statement of the worker is here (with its submodules `fresh`, a new run's
//! write, and `lookup`, what is stored already), in [`parts`] and in [`history`] (the
//! maintenance commands'). The static ones are checked at compile time against the schema
//! (see `checked!` and `scripts/sqlx-prepare.sh`), except `applied_versions` (sqlx's own
//! table) and the parameterless `SELECT 1` probes. The partition DDL and archive
//! statements of [`history`] are built at run time from table and month names.

use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use serde_json::Value;
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{Connection, PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::config::DatabaseSettings;
use crate::ingest::RunLine;
use crate::message::RunCompleted;
use crate::summary::Extraction;
use crate::summary::extract::MetricRow;

/// `Db::query(SQL)` (or the `query` of another statement maker, see `history`) with the
/// arguments bound, the SQL and the arguments' types checked at compile time by
/// `sqlx::query!` against the query data in `.sqlx/` (`scripts/sqlx-prepare.sh`). An
/// argument written `_ expr` is bound as is but not type-checked (a `Json` wrapper or an
/// array of them, which the macro knows only as `serde_json::Value`).
///
/// Why the macro only checks: the statement `sqlx::query!` builds for a query with
/// rows cannot be made unnamed (`Map` has no `persistent`), and behind a transaction
/// pooler every statement must be (`database.prepared_statements = false`, see [`Db`]).
/// The `if false` branch is never run; the arguments are evaluated once, by the bind.
macro_rules! checked {
    (@go $db:expr, $sql:literal, [$($chk:tt)*], [$($bind:tt)*] $(,)?) => {{
        #[allow(clippy::all, unused_must_use)]
        if false {
            let _ = sqlx::query!($sql $($chk)*);
        }
        $db.query($sql) $($bind)*
    }};
    (@go $db:expr, $sql:literal, [$($chk:tt)*], [$($bind:tt)*], _ $e:expr $(, $($rest:tt)*)?) => {
        checked!(@go $db, $sql, [$($chk)* , ($e) as _], [$($bind)* .bind($e)] $(, $($rest)*)?)
    };
    (@go $db:expr, $sql:literal, [$($chk:tt)*], [$($bind:tt)*], $e:expr $(, $($rest:tt)*)?) => {
        checked!(@go $db, $sql, [$($chk)* , $e], [$($bind)* .bind($e)] $(, $($rest)*)?)
    };
    ($db:expr, $sql:literal $(, $($args:tt)*)?) => {
        checked!(@go $db, $sql, [], [] $(, $($args)*)?)
    };
}

mod fresh;
pub mod history;
mod lookup;
pub mod parts;

/// The embedded migrations (`migrations/`); `build.rs` makes new files trigger a rebuild.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!();

pub async fn connect(s: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let url = s.url()?;
    let options: PgConnectOptions = url
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid database.url: {e}"))?;
    let pool = PgPoolOptions::new()
        .max_connections(s.max_connections)
        .acquire_timeout(Duration::from_secs(s.acquire_timeout_secs))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_IF_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_lazy_with(options.application_name("k6-ingest"));
    Ok(pool)
}

/// A pooled connection idle at least this long is pinged before it is handed out;
/// one used more recently is not. sqlx pings every connection it takes back (a round
/// trip), so pinging again on every acquire spends a second round trip per statement
/// batch on a connection that answered a moment ago: under load that was two of a run's
/// twelve round trips. After an outage connections sit idle while deliveries are held,
/// so they are pinged (and a dead one replaced) before a run uses them; one that broke
/// within this window fails its statement, which is a database fault like any other.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

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
    /// The gathering of runs' lookups, shared by the clones of this `Db` (see [`lookup`]).
    lookups: std::sync::Arc<lookup::Lookups>,
}

impl Db {
    pub fn new(pool: PgPool, prepared_statements: bool) -> Self {
        Self {
            pool,
            prepared: prepared_statements,
            lookups: Default::default(),
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
        checked!(self, "SELECT k6_ensure_month($1)", month_of(at),)
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

/// A connection of its own and `SELECT 1`, for the breaker: the pool keeps retrying a
/// refused connect until its acquire timeout, which would only delay the verdict, and a
/// new connection is what the pool needs to recover.
pub async fn probe_new_connection(options: &PgConnectOptions) -> bool {
    use sqlx::{Connection as _, Executor as _};
    let Ok(mut conn) = sqlx::PgConnection::connect_with(options).await else {
        return false;
    };
    // SQL text without arguments goes as a simple query, as `raw_sql` would (no prepared
    // statement, so it works through a transaction pooler); `raw_sql` itself does not
    // compile into the breaker's spawned probe loops.
    let ok = conn.execute("SELECT 1").await.is_ok();
    let _ = conn.close().await;
    ok
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

/// Not checked at compile time: `_sqlx_migrations` is sqlx's own table, made by the
/// migrator at run time, not part of the schema the checks are made against.
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
/// PostgreSQL is unavailable to everyone; a lock not granted in time (`55P03`: creating
/// a month's partitions waits at most 2 s behind another session's long transaction) is
/// contention to wait out; a serialization failure or a deadlock (`40001`, `40P01`) is
/// this transaction's bad luck and costs an attempt; the rest is permanent.
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
            } else if code == "55P03" {
                Fault::Contended
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
    /// Every `s3://` URI a committed row of the run refers to. Objects listed here are
    /// never deleted: a concurrent duplicate that committed first refers to the same
    /// deterministic keys.
    pub async fn referenced_s3_uris(&self, run_id: Uuid) -> Result<Vec<String>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = checked!(
            self,
            "SELECT r.artifact_paths, r.logs_s3_url, p.summary_s3_url FROM runs r \
                 LEFT JOIN k6_performance_runs p ON p.run_id = r.id WHERE r.id = $1",
            run_id,
        )
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
        if let Some(stored) = self.store_fresh(new).await? {
            return Ok(stored);
        }
        let mut tx = self.pool.begin().await?;
        let msg = new.msg;
        let run = RunValues::of(new);
        let Some(lock) = self.lock_run(&mut tx, msg, &run, new.has_summary).await? else {
            tx.rollback().await?;
            return Ok(Stored::AlreadyPresent);
        };
        let replaced = self.settle_run(&mut tx, msg, &run, lock).await?;
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
        let Some(lock) = self.lock_run(&mut tx, msg, &run, true).await? else {
            tx.rollback().await?;
            return Ok(Stored::AlreadyPresent);
        };
        let replaced = self.settle_run(&mut tx, msg, &run, lock).await?;
        let k6_run_id = Uuid::now_v7();
        let row = checked!(
            self,
            "INSERT INTO k6_performance_runs (id, run_id, test_id, organization_id, project_id, location, \
                     status, started_at, completed_at, duration_ms, exit_code, warnings) \
                 VALUES ($1, $2, $3, $4, $5, COALESCE($6, 'us-east'), 'error', $7, $8, $9, $10, $11) \
                 ON CONFLICT DO NOTHING RETURNING id",
            k6_run_id,
            msg.run_id,
            msg.test_id,
            msg.organization_id,
            msg.project_id,
            msg.location.as_deref(),
            msg.started_at,
            msg.completed_at,
            msg.wall_duration_ms(),
            msg.exit_code,
            _ Json(vec![rec.reason]),
        )
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
    /// replaces. `None` when the stored record is final (nothing to write).
    ///
    /// The `runs` row is the anchor: it is inserted (or found) and locked FIRST, so two
    /// concurrent writes of one run are serialised on it, and the second one then sees
    /// the first one's k6_performance_runs row, whatever month it went to (the unique
    /// key of the partitioned table includes `started_at`, so it could not settle this
    /// alone). The insert writes nothing over an existing row: the tenant is checked
    /// on the locked row before anything else is written.
    ///
    /// [`Locked::Fresh`] without reading anything back when the insert made the row: it is
    /// this transaction's (locked until commit) with the values the upsert would write,
    /// and no k6_performance_runs row can refer to a run that did not exist.
    async fn lock_run(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
        has_summary: bool,
    ) -> Result<Option<Locked>, StoreError> {
        let fresh = self
            .insert_run_if_absent(tx, msg, run)
            .await
            .map_err(|e| StoreError::from_write("runs", e))?;
        if fresh {
            return Ok(Some(Locked::Fresh));
        }
        let row = checked!(
            self,
            "SELECT organization_id, project_id, k6_archived_month IS NOT NULL AS archived FROM runs \
                 WHERE id = $1 FOR UPDATE",
            msg.run_id,
        )
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
        let prior = checked!(
            self,
            "SELECT id, summary_format IS NOT NULL AS has_summary FROM k6_performance_runs \
                 WHERE run_id = $1 FOR UPDATE",
            msg.run_id,
        )
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
            checked!(
                self,
                "DELETE FROM k6_performance_runs WHERE id = $1",
                old_id,
            )
            .execute(&mut **tx)
            .await?;
        }
        Ok(Some(Locked::Existing {
            replaced: prior.is_some(),
        }))
    }

    /// Brings a locked `runs` row to this write's values; whether an earlier record was
    /// replaced. A row this transaction inserted has them already.
    async fn settle_run(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
        lock: Locked,
    ) -> Result<bool, StoreError> {
        let Locked::Existing { replaced } = lock else {
            return Ok(false);
        };
        self.upsert_run(tx, msg, run)
            .await
            .map_err(|e| StoreError::from_write("runs", e))?;
        Ok(replaced)
    }

    /// The headline numbers of a stored run.
    pub async fn stored_line(&self, run_id: Uuid) -> Result<RunLine, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let row = checked!(
            self,
            "SELECT status, p95_response_time_ms, request_rate, thresholds_total, thresholds_failed, \
                 checks_total, checks_passed FROM k6_performance_runs WHERE run_id = $1",
            run_id,
        )
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

/// What the INSERT of a `runs` row does when the row exists.
#[derive(Clone, Copy)]
enum OnConflict {
    /// Leaves it as it is (and returns no row).
    Nothing,
    /// Updates it with what the message says, keeping what it leaves out.
    Update,
}

/// A run's `runs` row, locked by this transaction.
enum Locked {
    /// Inserted by this transaction.
    Fresh,
    /// There before; `replaced`: an earlier record without a summary was deleted.
    Existing { replaced: bool },
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

impl<'a> RunValues<'a> {
    /// A run's values as its extraction and uploads give them, metadata merged.
    fn of(new: &'a NewRun<'_>) -> Self {
        Self {
            status: new.extraction.columns.status.as_str(),
            duration_ms: new.duration_ms,
            artifact_paths: &new.artifact_paths,
            logs_s3_url: new.logs_s3_url.as_deref(),
            error_details: new.extraction.status_details.as_deref(),
            metadata: true,
        }
    }

    /// The metadata the `runs` row merges: the message's object, or `{}`.
    fn metadata_of(&self, msg: &RunCompleted) -> Value {
        msg.metadata
            .clone()
            .filter(|m| self.metadata && m.is_object())
            .unwrap_or_else(|| Value::Object(Default::default()))
    }
}

impl Db {
    /// The `runs` row as [`Db::upsert_run`] would write it, only if there is none;
    /// whether it was inserted.
    async fn insert_run_if_absent(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
    ) -> Result<bool, sqlx::Error> {
        self.write_runs_row(tx, msg, run, OnConflict::Nothing).await
    }

    /// The `runs` row, created or updated: the application may have created it when the
    /// run started, so what the message leaves out keeps the stored value.
    async fn upsert_run(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
    ) -> Result<(), sqlx::Error> {
        self.write_runs_row(tx, msg, run, OnConflict::Update)
            .await
            .map(|_| ())
    }

    /// One INSERT of the `runs` row with its values bound; whether a row was written.
    /// The two conflict clauses are two whole statements so that each is checked.
    async fn write_runs_row(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        run: &RunValues<'_>,
        on_conflict: OnConflict,
    ) -> Result<bool, sqlx::Error> {
        let metadata = run.metadata_of(msg);
        let trigger = msg.trigger.map(|t| t.as_str());
        macro_rules! runs_row {
            ($sql:literal) => {
                checked!(
                    self,
                    $sql,
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
                    trigger,
                    msg.location.as_deref(),
                    _ Json(&metadata)
                )
            };
        }
        let query = match on_conflict {
            OnConflict::Nothing => runs_row!(
                "INSERT INTO runs (id, job_id, test_id, organization_id, project_id, status, duration_ms, \
                     started_at, completed_at, artifact_paths, logs_s3_url, error_details, trigger, location, metadata) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
                 ON CONFLICT (id) DO NOTHING RETURNING true AS written"
            ),
            OnConflict::Update => runs_row!(
                "INSERT INTO runs (id, job_id, test_id, organization_id, project_id, status, duration_ms, \
                     started_at, completed_at, artifact_paths, logs_s3_url, error_details, trigger, location, metadata) \
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
                     updated_at = now() RETURNING true AS written"
            ),
        };
        query
            .fetch_optional(&mut **tx)
            .await
            .map(|row| row.is_some())
    }

    async fn insert_performance(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        id: Uuid,
    ) -> Result<bool, sqlx::Error> {
        let msg = new.msg;
        let c = &new.extraction.columns;
        let row = checked!(
            self,
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
            id,
            msg.run_id,
            msg.test_id,
            msg.organization_id,
            msg.project_id,
            msg.location.as_deref(),
            c.status.as_str(),
            msg.started_at,
            msg.completed_at,
            new.duration_ms,
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
        )
        .fetch_optional(&mut **tx)
        .await?;
        Ok(row.is_some())
    }

    /// One statement for all of a run's metric rows, its columns bound as arrays and
    /// unnested: one round trip and one prepared statement whatever the row count.
    async fn insert_metrics(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        k6_run_id: Uuid,
    ) -> Result<(), sqlx::Error> {
        let rows = &new.extraction.metrics;
        if rows.is_empty() {
            return Ok(());
        }
        let col = |f: fn(&MetricRow) -> Option<i64>| rows.iter().map(f).collect::<Vec<_>>();
        let recorded_at = new.msg.completed_at.unwrap_or(new.msg.started_at);
        checked!(
            self,
            "INSERT INTO k6_metrics_history (id, k6_run_id, metric_name, base_name, metric_type, contains, tags, \
                 scale, value, count, rate, rate_scale, passes, fails, min_value, max_value, avg_value, med_value, \
                 p90_value, p95_value, p99_value, percentiles, raw_values, sources, warnings, recorded_at, started_at) \
             SELECT id, $2, metric_name, base_name, metric_type, contains, tags, scale, value, count, rate, \
                 rate_scale, passes, fails, min_value, max_value, avg_value, med_value, p90_value, p95_value, \
                 p99_value, percentiles, raw_values, sources, warnings, $3, $4 \
             FROM UNNEST($1::uuid[], $5::text[], $6::text[], $7::text[], $8::text[], $9::jsonb[], $10::int4[], \
                 $11::int8[], $12::int8[], $13::int8[], $14::int4[], $15::int8[], $16::int8[], $17::int8[], \
                 $18::int8[], $19::int8[], $20::int8[], $21::int8[], $22::int8[], $23::int8[], $24::jsonb[], \
                 $25::jsonb[], $26::jsonb[], $27::jsonb[]) \
             AS t(id, metric_name, base_name, metric_type, contains, tags, scale, value, count, rate, rate_scale, \
                 passes, fails, min_value, max_value, avg_value, med_value, p90_value, p95_value, p99_value, \
                 percentiles, raw_values, sources, warnings)",
            _ new_ids(rows.len()),
            k6_run_id,
            recorded_at,
            new.msg.started_at,
            _ rows.iter().map(|m| m.metric_name.as_str()).collect::<Vec<_>>(),
            _ rows.iter().map(|m| m.base_name.as_str()).collect::<Vec<_>>(),
            _ rows.iter().map(|m| m.metric_type).collect::<Vec<_>>(),
            _ rows.iter().map(|m| m.contains).collect::<Vec<_>>(),
            _ rows.iter().map(|m| Json(&m.tags)).collect::<Vec<_>>(),
            _ rows.iter().map(|m| m.scale).collect::<Vec<_>>(),
            _ col(|m| m.value),
            _ col(|m| m.count),
            _ col(|m| m.rate),
            _ rows.iter().map(|m| m.rate_scale).collect::<Vec<_>>(),
            _ col(|m| m.passes),
            _ col(|m| m.fails),
            _ col(|m| m.min_value),
            _ col(|m| m.max_value),
            _ col(|m| m.avg_value),
            _ col(|m| m.med_value),
            _ col(|m| m.p90_value),
            _ col(|m| m.p95_value),
            _ col(|m| m.p99_value),
            _ rows.iter().map(|m| Json(&m.percentiles)).collect::<Vec<_>>(),
            _ rows.iter().map(|m| Json(&m.raw_values)).collect::<Vec<_>>(),
            _ rows.iter().map(|m| Json(&m.sources)).collect::<Vec<_>>(),
            _ rows.iter().map(|m| Json(&m.warnings)).collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The threshold rows in one statement, as [`Db::insert_metrics`].
    async fn insert_thresholds(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        k6_run_id: Uuid,
    ) -> Result<(), sqlx::Error> {
        let rows = &new.extraction.thresholds;
        if rows.is_empty() {
            return Ok(());
        }
        checked!(
            self,
            "INSERT INTO k6_threshold_results (id, k6_run_id, metric_name, base_name, tags, expression, ok, \
                 aggregation, observed_value, observed_scale, observed_raw, observed_source, started_at) \
             SELECT id, $2, metric_name, base_name, tags, expression, ok, aggregation, observed_value, \
                 observed_scale, observed_raw, observed_source, $3 \
             FROM UNNEST($1::uuid[], $4::text[], $5::text[], $6::jsonb[], $7::text[], $8::bool[], $9::text[], \
                 $10::int8[], $11::int4[], $12::float8[], $13::text[]) \
             AS t(id, metric_name, base_name, tags, expression, ok, aggregation, observed_value, observed_scale, \
                 observed_raw, observed_source)",
            _ new_ids(rows.len()),
            k6_run_id,
            new.msg.started_at,
            _ rows.iter().map(|t| t.metric_name.as_str()).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.base_name.as_str()).collect::<Vec<_>>(),
            _ rows.iter().map(|t| Json(&t.tags)).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.expression.as_str()).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.ok).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.aggregation.as_deref()).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.observed_value).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.observed_scale).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.observed_raw).collect::<Vec<_>>(),
            _ rows.iter().map(|t| t.observed_source).collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// The check rows in one statement, as [`Db::insert_metrics`]. A check's group path
    /// is an array of its own and arrays of arrays must be rectangular in PostgreSQL:
    /// each path travels as a JSON array and is turned back into `text[]` in order.
    async fn insert_checks(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        new: &NewRun<'_>,
        k6_run_id: Uuid,
    ) -> Result<(), sqlx::Error> {
        let rows = &new.extraction.checks;
        if rows.is_empty() {
            return Ok(());
        }
        checked!(
            self,
            "INSERT INTO k6_check_results (id, k6_run_id, position, group_path, path, name, passes, fails, started_at) \
             SELECT id, $2, position, \
                 ARRAY(SELECT g.v FROM jsonb_array_elements_text(group_path) WITH ORDINALITY AS g(v, n) ORDER BY g.n), \
                 path, name, passes, fails, $3 \
             FROM UNNEST($1::uuid[], $4::int4[], $5::jsonb[], $6::text[], $7::text[], $8::int8[], $9::int8[]) \
             AS t(id, position, group_path, path, name, passes, fails)",
            _ new_ids(rows.len()),
            k6_run_id,
            new.msg.started_at,
            _ rows.iter().map(|c| c.position).collect::<Vec<_>>(),
            _ rows.iter().map(|c| Json(&c.group_path)).collect::<Vec<_>>(),
            _ rows.iter().map(|c| c.path.as_str()).collect::<Vec<_>>(),
            _ rows.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            _ rows.iter().map(|c| c.passes).collect::<Vec<_>>(),
            _ rows.iter().map(|c| c.fails).collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// Ids for `n` new rows, time-ordered as the rows are.
fn new_ids(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::now_v7()).collect()
}
