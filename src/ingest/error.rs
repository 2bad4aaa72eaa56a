//! The ingest boundary's error: one enum whose variants carry the ids, and the one
//! method that turns an error into what the driver does with the message.

use uuid::Uuid;

use crate::artifact::FetchError;
use crate::db::StoreError;
use crate::fault::Fault;
use crate::message::MessageError;
use crate::s3::UploadError;

/// What a driver does with a message after `ingest_one`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Done (stored now or before): acknowledge.
    Ack,
    /// A fault that may pass: try again later, with backoff.
    Retry,
    /// Retrying cannot help: keep the message, with the reason, for a person.
    DeadLetter,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Message(#[from] MessageError),
    #[error("run {run_id}: {artifact} artifact: {source}")]
    Fetch {
        run_id: Uuid,
        artifact: &'static str,
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
    /// The run was recorded with status `error` because its summary is missing or
    /// unreadable although k6 should have written one; the message is kept so it can
    /// be replayed once the summary is fixed.
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
            Self::Message(_)
            | Self::SummaryUnusable { .. }
            | Self::ContentRefused { .. }
            | Self::Config { .. } => Fault::Permanent,
        }
    }

    /// A short, stable label for metrics and dead-letter headers.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Message(m) => m.class(),
            Self::Fetch { .. } => "fetch",
            Self::Upload { .. } => "upload",
            Self::Store {
                source: StoreError::TenantMismatch { .. },
                ..
            } => "tenant_mismatch",
            Self::Store {
                source: StoreError::Refused { .. },
                ..
            }
            | Self::ContentRefused { .. } => "content_refused",
            Self::Store { .. } => "database",
            Self::SummaryUnusable { .. } => "summary_unusable",
            Self::Config { .. } => "config",
        }
    }
}
