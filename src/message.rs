//! The run-completed message a runner publishes when k6 finishes (SPEC section 2).
//!
//! Decoding is two-step: read `schema_version` first, then the body of that version, so
//! an unknown version is named as such instead of failing on some field of it. Unknown
//! fields of a known version are ignored: later producers may add some.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Why a message body cannot be ingested. Always permanent: retrying will not help.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum MessageError {
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    #[error("message has no integer `schema_version`")]
    NoVersion,
    #[error("unknown schema_version {0} (this worker reads version 1)")]
    UnknownVersion(i64),
    #[error("invalid version 1 message: {0}")]
    Invalid(String),
}

impl MessageError {
    /// A short, stable label for metrics and dead-letter headers.
    pub fn class(&self) -> &'static str {
        match self {
            Self::NotJson(_) => "not_json",
            Self::NoVersion | Self::UnknownVersion(_) => "unknown_version",
            Self::Invalid(_) => "invalid_message",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    Manual,
    Schedule,
    Api,
    CiCd,
    Remote,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Manual => "manual",
            Self::Schedule => "schedule",
            Self::Api => "api",
            Self::CiCd => "ci_cd",
            Self::Remote => "remote",
        }
    }
}

/// Where the run's files are: `s3://`, `http(s)://`, `file://` URIs, or paths relative
/// to the message file (replay only).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Artifacts {
    #[serde(default)]
    pub summary: Option<String>,
    #[serde(default)]
    pub logs: Option<String>,
    #[serde(default)]
    pub report_html: Option<String>,
    #[serde(default)]
    pub metrics: Option<String>,
}

/// Version 1 of the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunCompleted {
    pub schema_version: u32,
    pub event_id: Uuid,
    pub run_id: Uuid,
    #[serde(default)]
    pub job_id: Option<Uuid>,
    pub test_id: Uuid,
    pub organization_id: Uuid,
    pub project_id: Uuid,
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub trigger: Option<Trigger>,
    pub started_at: DateTime<Utc>,
    #[serde(default)]
    pub completed_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub exit_code: Option<i32>,
    #[serde(default)]
    pub k6_version: Option<String>,
    pub artifacts: Artifacts,
    #[serde(default)]
    pub config_snapshot: Option<Value>,
    #[serde(default)]
    pub metadata: Option<Value>,
}

impl RunCompleted {
    /// Decodes a message body of any version this worker knows.
    pub fn decode(body: &[u8]) -> Result<Self, MessageError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| MessageError::NotJson(e.to_string()))?;
        let version = value
            .get("schema_version")
            .and_then(Value::as_i64)
            .ok_or(MessageError::NoVersion)?;
        if version != 1 {
            return Err(MessageError::UnknownVersion(version));
        }
        let msg: Self =
            serde_json::from_value(value).map_err(|e| MessageError::Invalid(e.to_string()))?;
        if let Some(loc) = &msg.location {
            if loc.chars().count() > 50 {
                return Err(MessageError::Invalid(format!(
                    "location is longer than 50 characters: {loc:?}"
                )));
            }
        }
        if let Some(done) = msg.completed_at {
            if done < msg.started_at {
                return Err(MessageError::Invalid(
                    "completed_at is before started_at".into(),
                ));
            }
        }
        Ok(msg)
    }

    /// Run duration from the message's own timestamps, for runs without a summary.
    pub fn wall_duration_ms(&self) -> Option<i64> {
        self.completed_at
            .map(|c| (c - self.started_at).num_milliseconds())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Value {
        serde_json::json!({
            "schema_version": 1,
            "event_id": "0190f7d2-0000-7000-8000-0000000000e1",
            "run_id": "0190f7d2-0000-7000-8000-0000000000a1",
            "job_id": null,
            "test_id": "0190f7d2-0000-7000-8000-0000000000b1",
            "organization_id": "0190f7d2-0000-7000-8000-000000000001",
            "project_id": "0190f7d2-0000-7000-8000-000000000002",
            "location": "us-east",
            "trigger": "ci_cd",
            "started_at": "2026-11-22T01:00:00Z",
            "completed_at": "2026-11-22T01:00:05Z",
            "exit_code": 0,
            "k6_version": "1.1.0",
            "artifacts": {"summary": "summary.json"},
            "some_future_field": {"ignored": true}
        })
    }

    #[test]
    fn decodes_and_ignores_unknown_fields() {
        let m = RunCompleted::decode(valid().to_string().as_bytes()).unwrap();
        assert_eq!(m.trigger, Some(Trigger::CiCd));
        assert_eq!(m.wall_duration_ms(), Some(5000));
    }

    #[test]
    fn names_what_is_wrong() {
        assert!(matches!(
            RunCompleted::decode(b"nope"),
            Err(MessageError::NotJson(_))
        ));
        let mut v = valid();
        v["schema_version"] = 2.into();
        assert_eq!(
            RunCompleted::decode(v.to_string().as_bytes()),
            Err(MessageError::UnknownVersion(2))
        );
        let mut v = valid();
        v.as_object_mut().unwrap().remove("run_id");
        let err = RunCompleted::decode(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("run_id"), "{err}");
        let mut v = valid();
        v["exit_code"] = "zero".into();
        assert!(matches!(
            RunCompleted::decode(v.to_string().as_bytes()),
            Err(MessageError::Invalid(_))
        ));
    }
}
