//! The ingest boundary's error: one enum whose variants carry the ids. Whether a failure
//! is retried was decided by the error that caused it ([`IngestError::fault`] only
//! forwards); [`IngestError::disposition`] turns that into what a driver does.

use uuid::Uuid;

use super::ArtifactRole;
use crate::artifact::FetchError;
use crate::db::StoreError;
use crate::fault::{Fault, ReasonClass};
use crate::s3::UploadError;

/// What a driver does with a message whose ingest failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// A fault that may pass: try again later, with backoff.
    Retry,
    /// Retrying cannot help: keep the message, with the reason, for a person.
    DeadLetter,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("run {run_id}: {artifact} artifact: {source}")]
    Fetch {
        run_id: Uuid,
        artifact: ArtifactRole,
        #[source]
        source: FetchError,
    },
    #[error("run {run_id}: {source}")]
    Upload {
        run_id: Uuid,
        #[source]
        source: UploadError,
    },
    #[error("run {run_id}: {source}")]
    Store {
        run_id: Uuid,
        #[source]
        source: StoreError,
    },
    /// The run is recorded with status `error` because its summary is missing or
    /// unreadable although k6 should have written one (or, in a dry run, would be): the
    /// message is kept so it can be replayed once the summary is fixed. After a commit
    /// this is [`super::Outcome::StoredAsError`]; see [`super::IngestReport::into_result`].
    #[error("run {run_id} recorded as error: {reason}")]
    SummaryUnusable { run_id: Uuid, reason: String },
    #[error("run {run_id}: {message}")]
    Config { run_id: Uuid, message: String },
    /// The database refused the run's content for good; the run was recorded as
    /// `error` with the reason, and the message is kept for a replay after a fix.
    #[error("run {run_id} recorded as error: {reason}")]
    ContentRefused { run_id: Uuid, reason: String },
}

impl IngestError {
    pub fn disposition(&self) -> Disposition {
        if self.fault().is_retryable() {
            Disposition::Retry
        } else {
            Disposition::DeadLetter
        }
    }

    /// Whose fault this is, as the error that caused it decided (see [`crate::fault`]).
    pub fn fault(&self) -> Fault {
        match self {
            Self::Fetch { source, .. } => source.fault(),
            Self::Upload { source, .. } => source.fault(),
            Self::Store { source, .. } => source.fault(),
            Self::SummaryUnusable { .. } | Self::ContentRefused { .. } | Self::Config { .. } => {
                Fault::Permanent
            }
        }
    }

    /// The label of metrics and dead-letter headers.
    pub fn class(&self) -> ReasonClass {
        match self {
            Self::Fetch { .. } => ReasonClass::Fetch,
            Self::Upload { .. } => ReasonClass::Upload,
            Self::Store {
                source: StoreError::TenantMismatch { .. },
                ..
            } => ReasonClass::TenantMismatch,
            Self::Store {
                source: StoreError::Refused { .. },
                ..
            }
            | Self::ContentRefused { .. } => ReasonClass::ContentRefused,
            Self::Store { .. } => ReasonClass::Database,
            Self::SummaryUnusable { .. } => ReasonClass::SummaryUnusable,
            Self::Config { .. } => ReasonClass::Config,
        }
    }

    pub(super) fn store(run_id: Uuid, source: impl Into<StoreError>) -> Self {
        Self::Store {
            run_id,
            source: source.into(),
        }
    }
}
