//! One run's path, top to bottom, each step a function of its own:
//!
//! `prior_record` (what is stored already, and whose) → `fetch` (summary, logs, report,
//! raw samples into local files) → `extract` (pure; raw samples read only when they fill
//! a gap) → `upload` (the run's artifacts to S3 at once) → `store` (one transaction) →
//! `outcome`.
//!
//! A run already stored is recognised before any artifact is touched, so redelivery
//! costs one query. Split-run parts share every step but the store (`parts.rs`); the
//! dry run is the fetch and extract steps alone ([`DryRun`]).

pub mod error;
mod parts;
mod steps;
mod store;
mod upload;

use std::path::PathBuf;

use uuid::Uuid;

pub use error::{Disposition, IngestError};
pub use steps::{ArtifactRole, DryRun};
pub use upload::ArtifactRecord;

use crate::artifact::Fetcher;
use crate::db::{Db, Existing, Stored};
use crate::fault::ReasonClass;
use crate::message::RunCompleted;
use crate::s3::ArtifactStore;
use crate::summary::Extraction;
use crate::summary::limits::SummaryLimits;
use steps::Extracted;
use store::Written;

/// How a driver wants one run handled.
#[derive(Debug, Clone, Default)]
pub struct IngestContext {
    /// The message file's directory (replay): relative artifact paths resolve here.
    pub base_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ingested,
    /// An earlier `error` record without a summary was replaced.
    Replaced,
    AlreadyPresent,
    DryRun,
    /// Committed with status `error` (the summary k6 should have written is unusable,
    /// or the database refused the content): the message is kept for a replay after a
    /// fix, and [`IngestReport::reason`] says why.
    StoredAsError(ReasonClass),
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingested => "ingested",
            Self::Replaced => "replaced",
            Self::AlreadyPresent => "already present",
            Self::DryRun => "dry run",
            Self::StoredAsError(_) => "stored as error",
        }
    }
}

/// The headline numbers of a run, as the replay table and logs show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunLine {
    pub status: Option<String>,
    pub p95_ms: Option<i64>,
    /// Requests per second × 100.
    pub request_rate: Option<i64>,
    pub thresholds_total: Option<i32>,
    pub thresholds_failed: Option<i32>,
    pub checks_total: Option<i64>,
    pub checks_passed: Option<i64>,
}

impl RunLine {
    fn from_extraction(e: &Extraction) -> Self {
        let c = &e.columns;
        Self {
            status: Some(c.status.as_str().to_string()),
            p95_ms: c.p95_response_time_ms,
            request_rate: c.request_rate,
            thresholds_total: c.thresholds_total,
            thresholds_failed: c.thresholds_failed,
            checks_total: c.checks_total,
            checks_passed: c.checks_passed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct IngestReport {
    pub run_id: Uuid,
    pub outcome: Outcome,
    pub line: RunLine,
    pub bytes_uploaded: u64,
    pub warnings: Vec<String>,
    /// Why the run is [`Outcome::StoredAsError`].
    pub reason: Option<String>,
}

impl IngestReport {
    /// A run stored as error as the error that keeps its message (what the consumer
    /// dead-letters and replay lists as failed); any other report as it is.
    pub fn into_result(self) -> Result<Self, IngestError> {
        let Outcome::StoredAsError(class) = self.outcome else {
            return Ok(self);
        };
        let (run_id, reason) = (self.run_id, self.reason.unwrap_or_default());
        Err(match class {
            ReasonClass::ContentRefused => IngestError::ContentRefused { run_id, reason },
            _ => IngestError::SummaryUnusable { run_id, reason },
        })
    }
}

/// k6 writes its summaries for these exit codes; a missing summary then is a fault of
/// the pipeline, not of the test (SPEC section 6 and k6-formats §12).
/// Without an exit code nothing says the summary may be missing, so it is expected.
fn summary_expected(exit_code: Option<i32>) -> bool {
    matches!(
        exit_code,
        None | Some(0 | 99 | 100 | 101 | 102 | 103 | 108 | 110)
    )
}

/// Everything a run's path needs; cheap to clone (pools and clients are shared).
#[derive(Clone)]
pub struct Ingestor {
    db: Db,
    store: ArtifactStore,
    /// The steps before any write, which are also the dry run.
    prepare: DryRun,
    /// `ingest.part_wait_secs`: see [`Ingestor::sweep_incomplete_parts`].
    part_wait: std::time::Duration,
}

/// What is stored already for a run, its tenant checked against the message.
struct Prior(Existing);

impl Prior {
    /// Final whatever this attempt fetches (`None`), or given whether it has a summary.
    fn is_final(&self, has_summary: Option<bool>) -> bool {
        match has_summary {
            None => self.0.performance_has_summary == Some(true),
            Some(has) => self.0.is_final(has),
        }
    }
}

impl Ingestor {
    pub fn new(
        pool: sqlx::PgPool,
        store: ArtifactStore,
        fetcher: Fetcher,
        inline_summary_max: u64,
    ) -> Self {
        Self {
            db: Db::new(pool, true),
            store,
            prepare: DryRun::new(fetcher, inline_summary_max),
            part_wait: std::time::Duration::from_secs(3600),
        }
    }

    /// How long a split run's parts may take to arrive (`ingest.part_wait_secs`).
    pub fn with_part_wait(mut self, wait: std::time::Duration) -> Self {
        self.part_wait = wait;
        self
    }

    pub fn part_wait(&self) -> std::time::Duration {
        self.part_wait
    }

    /// Caps on a summary's tree and detail rows (`Settings::summary_limits`).
    pub fn with_summary_limits(mut self, limits: SummaryLimits) -> Self {
        self.prepare = self.prepare.with_summary_limits(limits);
        self
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        self.db.pool()
    }

    /// `database.prepared_statements`: false behind a transaction pooler without
    /// prepared-statement support (see [`Db`]).
    pub fn with_prepared_statements(mut self, on: bool) -> Self {
        self.db = Db::new(self.db.pool().clone(), on);
        self
    }

    /// The artifact store, for its outage probe.
    pub fn artifact_store(&self) -> &ArtifactStore {
        &self.store
    }

    /// The fetch and extract steps alone: a dry run that writes nothing.
    pub fn dry(&self) -> &DryRun {
        &self.prepare
    }

    /// Ingests one run or part. `Ok` means the run is stored (now or before), possibly
    /// as [`Outcome::StoredAsError`]; `Err` says what went wrong and, through
    /// `disposition`, what to do.
    #[tracing::instrument(name = "ingest", skip_all, fields(run.id = %msg.run_id, event.id = %msg.event_id,
        organization.id = %msg.organization_id, project.id = %msg.project_id))]
    pub async fn ingest(
        &self,
        msg: &RunCompleted,
        ctx: &IngestContext,
    ) -> Result<IngestReport, IngestError> {
        match &msg.part {
            Some(part) => self.ingest_part(msg, part, ctx).await,
            None => self.ingest_run(msg, ctx).await,
        }
    }

    /// [`Ingestor::ingest`], with a run stored as error given as the error that keeps
    /// its message ([`IngestReport::into_result`]): for callers that ask only whether
    /// the run went in whole.
    pub async fn ingest_one(
        &self,
        msg: &RunCompleted,
        ctx: &IngestContext,
    ) -> Result<IngestReport, IngestError> {
        self.ingest(msg, ctx).await?.into_result()
    }

    async fn ingest_run(
        &self,
        msg: &RunCompleted,
        ctx: &IngestContext,
    ) -> Result<IngestReport, IngestError> {
        let prior = self.prior_record(msg).await?;
        if prior.is_final(None) {
            return self.already_present(msg.run_id).await;
        }
        let mut fetched = self.prepare.fetch(msg, ctx).await?;
        if prior.is_final(Some(fetched.has_summary())) {
            return self.already_present(msg.run_id).await;
        }
        let extracted = self.prepare.extract(msg, &mut fetched).await?;
        let uploaded = self
            .upload(msg, fetched.summary, &mut fetched.artifacts, "")
            .await?;
        let bytes_uploaded = uploaded.objects.bytes;
        let written = self.store(msg, &extracted, uploaded).await?;
        self.outcome(msg, written, extracted, bytes_uploaded).await
    }

    /// What is stored already for the run, refused if it belongs to another tenant.
    async fn prior_record(&self, msg: &RunCompleted) -> Result<Prior, IngestError> {
        let existing = self
            .db
            .existing(msg.run_id)
            .await
            .map_err(|e| IngestError::store(msg.run_id, e))?;
        existing
            .check_tenant(msg)
            .map_err(|e| IngestError::store(msg.run_id, e))?;
        Ok(Prior(existing))
    }

    /// The report of a written run.
    async fn outcome(
        &self,
        msg: &RunCompleted,
        written: Written,
        extracted: Extracted,
        bytes_uploaded: u64,
    ) -> Result<IngestReport, IngestError> {
        let (outcome, reason) = match written {
            Written::Run(Stored::AlreadyPresent) => return self.already_present(msg.run_id).await,
            Written::Refused { reason } => (
                Outcome::StoredAsError(ReasonClass::ContentRefused),
                Some(reason),
            ),
            Written::Run(stored) => match extracted.unusable(msg) {
                Some(reason) => (
                    Outcome::StoredAsError(ReasonClass::SummaryUnusable),
                    Some(reason),
                ),
                None if matches!(stored, Stored::Replaced { .. }) => (Outcome::Replaced, None),
                None => (Outcome::Ingested, None),
            },
        };
        let extraction = extracted.extraction;
        tracing::debug!(
            outcome = outcome.as_str(),
            status = extraction.columns.status.as_str(),
            bytes_uploaded,
            "run stored"
        );
        Ok(IngestReport {
            run_id: msg.run_id,
            outcome,
            line: RunLine::from_extraction(&extraction),
            bytes_uploaded,
            warnings: extraction.columns.warnings,
            reason,
        })
    }

    async fn already_present(&self, run_id: Uuid) -> Result<IngestReport, IngestError> {
        let line = self
            .db
            .stored_line(run_id)
            .await
            .map_err(|e| IngestError::store(run_id, e))?;
        Ok(IngestReport {
            run_id,
            outcome: Outcome::AlreadyPresent,
            line,
            bytes_uploaded: 0,
            warnings: Vec::new(),
            reason: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(outcome: Outcome, reason: Option<&str>) -> IngestReport {
        IngestReport {
            run_id: Uuid::nil(),
            outcome,
            line: RunLine::default(),
            bytes_uploaded: 0,
            warnings: Vec::new(),
            reason: reason.map(str::to_string),
        }
    }

    #[test]
    fn a_run_stored_as_error_keeps_its_message_with_class_and_reason() {
        let unusable = report(
            Outcome::StoredAsError(ReasonClass::SummaryUnusable),
            Some("summary unavailable: artifact s.json not found"),
        )
        .into_result()
        .unwrap_err();
        assert_eq!(unusable.class(), ReasonClass::SummaryUnusable);
        assert_eq!(unusable.disposition(), Disposition::DeadLetter);
        assert_eq!(
            unusable.to_string(),
            "run 00000000-0000-0000-0000-000000000000 recorded as error: \
             summary unavailable: artifact s.json not found"
        );
        let refused = report(
            Outcome::StoredAsError(ReasonClass::ContentRefused),
            Some("the database refused the run's runs rows: x"),
        )
        .into_result()
        .unwrap_err();
        assert_eq!(refused.class(), ReasonClass::ContentRefused);
        assert!(matches!(refused, IngestError::ContentRefused { .. }));
        let ingested = report(Outcome::Ingested, None).into_result().unwrap();
        assert_eq!(ingested.outcome, Outcome::Ingested);
    }
}
