//! The store step of a whole run: one transaction, or, when the database refuses the
//! run's content, an `error` record in its own.

use super::steps::{ArtifactRole, Extracted};
use super::upload::{Uploaded, Uploads};
use super::{IngestError, Ingestor};
use crate::db::{ErrorRecord, NewRun, StoreError, Stored};
use crate::message::RunCompleted;

/// What the store step wrote.
pub(super) enum Written {
    Run(Stored),
    /// The content was refused; the run is recorded as `error` with this reason.
    Refused {
        reason: String,
    },
}

impl Ingestor {
    /// Writes the run. A run some other delivery stored first keeps its rows, which
    /// refer to their own uploads: anything else of this attempt is removed.
    pub(super) async fn store(
        &self,
        msg: &RunCompleted,
        extracted: &Extracted,
        uploaded: Uploaded,
    ) -> Result<Written, IngestError> {
        let extraction = &extracted.extraction;
        let new = NewRun {
            msg,
            extraction,
            has_summary: extracted.summary_reason.is_none(),
            duration_ms: extraction
                .columns
                .duration_ms
                .or_else(|| msg.wall_duration_ms()),
            artifact_paths: uploaded.artifact_paths(),
            logs_s3_url: uploaded.s3_of(ArtifactRole::Logs),
            summary_s3_url: uploaded.s3_of(ArtifactRole::Summary),
            summary_json: uploaded.summary_json,
        };
        let objects = uploaded.objects;
        match self.db.store_run(&new).await {
            Ok(Stored::AlreadyPresent) => {
                self.remove_unreferenced(msg.run_id, &objects).await;
                Ok(Written::Run(Stored::AlreadyPresent))
            }
            Ok(stored) => Ok(Written::Run(stored)),
            Err(refusal @ StoreError::Refused { .. }) => {
                self.record_refusal(&new, &objects, refusal).await
            }
            Err(e) => {
                if refuses_every_attempt(&e) {
                    self.remove_unreferenced(msg.run_id, &objects).await;
                }
                Err(IngestError::store(msg.run_id, e))
            }
        }
    }

    /// The database refused the run's content: record the run as `error` (in its own
    /// transaction, without the refused content, referring to the uploaded artifacts so
    /// a person can look at them). If even that record cannot be written, the uploads
    /// no row refers to are deleted and the refusal is returned as it is.
    async fn record_refusal(
        &self,
        new: &NewRun<'_>,
        uploads: &Uploads,
        refusal: StoreError,
    ) -> Result<Written, IngestError> {
        let run_id = new.msg.run_id;
        let reason = refusal.to_string();
        tracing::warn!(error = %reason, "the database refused the run; recording it as error");
        let record = ErrorRecord {
            msg: new.msg,
            reason: &reason,
            artifact_paths: &new.artifact_paths,
            logs_s3_url: new.logs_s3_url.as_deref(),
        };
        match self.db.store_error(&record).await {
            Ok(Stored::Inserted { .. } | Stored::Replaced { .. }) => {
                Ok(Written::Refused { reason })
            }
            Ok(Stored::AlreadyPresent) => {
                self.remove_unreferenced(run_id, uploads).await;
                Ok(Written::Refused { reason })
            }
            Err(e) => {
                tracing::error!(error = %e, "the error record of a refused run was not stored either");
                if refuses_every_attempt(&e) {
                    self.remove_unreferenced(run_id, uploads).await;
                }
                // The tenant check of the error record wins over the refusal.
                Err(match e {
                    e @ StoreError::TenantMismatch { .. } => IngestError::store(run_id, e),
                    _ => IngestError::store(run_id, refusal),
                })
            }
        }
    }
}

/// A store failure every attempt of the message meets (the content or the tenant is
/// refused), so no concurrent duplicate can be about to commit rows referring to the
/// same keys: only then are this attempt's uploads removed. After any other failure
/// (connection trouble, a misconfigured pooler...) they stay; a retry or a replay
/// uploads them again under the same keys and refers to them.
pub(super) fn refuses_every_attempt(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::TenantMismatch { .. } | StoreError::Refused { .. }
    )
}
