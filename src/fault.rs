//! Whose fault a failure is: a dependency's (the worker pauses and probes it) or the
//! message's (the attempt budget pays for it).
//!
//! Each error type decides this once, where its variants are made: `FetchError::fault`
//! and `StoreError::fault` by one function per type, S3 SDK errors by `s3::sdk_fault`
//! when an `UploadError` or `FetchError::S3` is built; `IngestError::fault` only
//! forwards, and the consumer and replay read it once per delivery or file (through
//! `IngestError::disposition`). [`ReasonClass`] names why a message was retried or
//! dead-lettered. A `Dependency` verdict is a suspicion the
//! consumer confirms with the dependency's probe (see `breaker`): if the probe answers,
//! the fault persists while the dependency is up, so it belongs to the message after all.
//! Erring towards `Dependency` therefore costs one probe; erring towards `Transient`
//! would burn the attempt budget during an outage.

use std::fmt;

/// A service the worker cannot work without, or an artifact host a message points at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dependency {
    /// PostgreSQL (`database.url`).
    Database,
    /// The worker's S3 endpoint: its artifact store, also where `s3://` artifacts come from.
    ArtifactStore,
    /// An allow-listed HTTP(S) artifact host, as `host:port`.
    ArtifactHost(String),
}

impl Dependency {
    /// The `dependency` label of metrics and the key in `/readyz`.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::ArtifactStore => "s3",
            Self::ArtifactHost(_) => "artifact_host",
        }
    }

    /// The `host:port` of an HTTP(S) URI, the key of its artifact host's breaker.
    pub fn host_of(uri: &str) -> Option<Self> {
        let url = url::Url::parse(uri).ok()?;
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        let host = url.host_str()?.to_ascii_lowercase();
        let port = url.port_or_known_default()?;
        Some(Self::ArtifactHost(format!("{host}:{port}")))
    }
}

impl fmt::Display for Dependency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ArtifactHost(h) => write!(f, "artifact host {h}"),
            other => f.write_str(other.label()),
        }
    }
}

/// Whose fault a failure is, and so what it costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The dependency looks down (refused or reset connections, timeouts, pool
    /// exhaustion, shutdown states, 5xx from S3): pause and probe, spend no attempt.
    Dependency(Dependency),
    /// May pass, but the dependencies answer: one attempt of the retry budget.
    Transient,
    /// PostgreSQL answers, but a lock the run needs is held by another session's long
    /// transaction (creating a month's partitions behind a report or `pg_dump`, which
    /// may last an hour): waited out as an outage is, without a slot, spending no
    /// attempt, since the run is not at fault and dead-lettering it would leave a
    /// backfill for a person to replay.
    Contended,
    /// Retrying cannot help: dead-letter with the reason.
    Permanent,
}

impl Fault {
    /// Worth trying again at all (a dependency outage, a lock held elsewhere or a
    /// transient fault).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Permanent)
    }
}

/// Why a message was retried or dead-lettered: the `reason` label of the retry and
/// dead-letter counters and the `x-k6-ingest-reason-class` header. The labels are a
/// published contract (dashboards and alerts match on them), so they never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonClass {
    NotJson,
    UnknownVersion,
    InvalidMessage,
    TooLarge,
    Fetch,
    Upload,
    TenantMismatch,
    ContentRefused,
    Database,
    SummaryUnusable,
    Config,
}

impl ReasonClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotJson => "not_json",
            Self::UnknownVersion => "unknown_version",
            Self::InvalidMessage => "invalid_message",
            Self::TooLarge => "too_large",
            Self::Fetch => "fetch",
            Self::Upload => "upload",
            Self::TenantMismatch => "tenant_mismatch",
            Self::ContentRefused => "content_refused",
            Self::Database => "database",
            Self::SummaryUnusable => "summary_unusable",
            Self::Config => "config",
        }
    }
}

impl fmt::Display for ReasonClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lets a label be compared with the string dashboards and headers carry.
impl PartialEq<&str> for ReasonClass {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::FetchError;
    use crate::s3::UploadError;

    #[test]
    fn reason_classes_serialize_as_their_labels() {
        use ReasonClass::*;
        let all = [
            NotJson,
            UnknownVersion,
            InvalidMessage,
            TooLarge,
            Fetch,
            Upload,
            TenantMismatch,
            ContentRefused,
            Database,
            SummaryUnusable,
            Config,
        ];
        for class in all {
            assert_eq!(
                serde_json::to_value(class).unwrap(),
                serde_json::Value::from(class.as_str())
            );
        }
        assert_eq!(SummaryUnusable.as_str(), "summary_unusable");
        assert_eq!(ContentRefused, "content_refused");
    }

    #[test]
    fn each_error_says_whose_fault_it_is() {
        let host = |uri: &str| FetchError::Transport {
            uri: uri.into(),
            message: "connection refused".into(),
        };
        assert_eq!(
            host("https://Artifacts.Internal/run/summary.json").fault(),
            Fault::Dependency(Dependency::ArtifactHost("artifacts.internal:443".into()))
        );
        assert_eq!(
            FetchError::Timeout {
                uri: "http://10.0.0.1:9000/s.json".into(),
                secs: 5
            }
            .fault(),
            Fault::Dependency(Dependency::ArtifactHost("10.0.0.1:9000".into()))
        );
        // Not a host: a local reader failing is the message's transient fault.
        assert_eq!(host("file:///data/s.json").fault(), Fault::Transient);
        for (status, fault) in [
            (503, Fault::Transient),
            (429, Fault::Transient),
            (408, Fault::Transient),
            (403, Fault::Permanent),
        ] {
            let e = FetchError::Status {
                uri: "http://h/s.json".into(),
                status,
            };
            assert_eq!(e.fault(), fault, "{status}");
        }
        let s3 = FetchError::S3 {
            uri: "s3://b/k".into(),
            message: "m".into(),
            fault: Fault::Dependency(Dependency::ArtifactStore),
        };
        assert_eq!(s3.fault(), Fault::Dependency(Dependency::ArtifactStore));
        let upload = UploadError {
            key: "k".into(),
            message: "m".into(),
            fault: Fault::Permanent,
        };
        assert_eq!(upload.fault(), Fault::Permanent);
        assert_eq!(
            crate::db::db_fault(&sqlx::Error::PoolTimedOut),
            Fault::Dependency(Dependency::Database)
        );
        assert_eq!(
            crate::db::db_fault(&sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            ))),
            Fault::Dependency(Dependency::Database)
        );
        assert_eq!(
            crate::db::db_fault(&sqlx::Error::RowNotFound),
            Fault::Permanent
        );
    }
}
