//! The run-completed message a runner publishes when k6 finishes (SPEC section 2).
//!
//! Decoding is two-step: read `schema_version` first, then the body of that version, so
//! an unknown version is named as such instead of failing on some field of it. Unknown
//! fields of a known version are ignored: later producers may add some. (A version 1
//! message without NUL is read in one step, to the same result: see `read_plain`.)

use chrono::{DateTime, Datelike, Utc};
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
    /// The label of metrics and dead-letter headers.
    pub fn class(&self) -> crate::fault::ReasonClass {
        use crate::fault::ReasonClass;
        match self {
            Self::NotJson(_) => ReasonClass::NotJson,
            Self::NoVersion | Self::UnknownVersion(_) => ReasonClass::UnknownVersion,
            Self::Invalid(_) => ReasonClass::InvalidMessage,
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

/// One runner's share of a run split across runners (SPEC section 12): every part of the
/// run carries the same `run_id`, and the merged result is written when all `count`
/// parts are stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub index: u32,
    pub count: u32,
    #[serde(default)]
    pub runner: Option<String>,
    /// k6's `--execution-segment` of this part (`0:1/4`), as the runner was started.
    #[serde(default)]
    pub execution_segment: Option<String>,
}

/// More parts than this is refused: the merge reads every part's summary again, and
/// holds them at once, so the count bounds its memory (k6-operator tests rarely use
/// more than a few dozen runners).
pub const MAX_PARTS: u32 = 256;

impl Part {
    /// Index and count from k6's `--execution-segment` and, when given,
    /// `--execution-segment-sequence` (what k6-operator passes each runner). Without a
    /// sequence the segment must be `i/n:(i+1)/n` of equal shares.
    pub fn from_execution_segment(segment: &str, sequence: Option<&str>) -> Result<Self, String> {
        let (from, to) = segment
            .split_once(':')
            .ok_or_else(|| format!("execution segment {segment:?} is not FROM:TO"))?;
        let (from, to) = (fraction(from)?, fraction(to)?);
        let (index, count) = match sequence {
            Some(seq) => {
                let points = seq
                    .split(',')
                    .map(fraction)
                    .collect::<Result<Vec<_>, _>>()?;
                let index = points
                    .windows(2)
                    .position(|w| w[0] == from && w[1] == to)
                    .ok_or_else(|| {
                        format!(
                            "execution segment {segment:?} is not a step of the sequence {seq:?}"
                        )
                    })?;
                (index, points.len().saturating_sub(1))
            }
            None => {
                // equal shares: to - from = 1/n and from = i/n
                let width = (to.0 * from.1)
                    .checked_sub(from.0 * to.1)
                    .filter(|w| *w > 0);
                let width =
                    width.ok_or_else(|| format!("execution segment {segment:?} is empty"))?;
                let denom = to.1 * from.1;
                if denom % width != 0 {
                    return Err(format!(
                        "execution segment {segment:?} is not an equal share; pass the sequence too"
                    ));
                }
                let n = denom / width;
                let i = from.0 * n / from.1;
                if i * from.1 != from.0 * n {
                    return Err(format!(
                        "execution segment {segment:?} does not start at a multiple of its width"
                    ));
                }
                (i as usize, n as usize)
            }
        };
        let part = Self {
            index: u32::try_from(index).map_err(|e| e.to_string())?,
            count: u32::try_from(count).map_err(|e| e.to_string())?,
            runner: None,
            execution_segment: Some(segment.to_string()),
        };
        part.validate()?;
        Ok(part)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.count == 0 || self.count > MAX_PARTS {
            return Err(format!(
                "part.count {} is not in 1..={MAX_PARTS}",
                self.count
            ));
        }
        if self.index >= self.count {
            return Err(format!(
                "part.index {} is not below part.count {}",
                self.index, self.count
            ));
        }
        Ok(())
    }
}

/// `a/b`, `0` or `1` as a reduced fraction (numerator, denominator).
fn fraction(s: &str) -> Result<(u64, u64), String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a fraction like 1/4");
    let (n, d) = match s.split_once('/') {
        Some((n, d)) => (
            n.trim().parse::<u64>().map_err(|_| bad())?,
            d.trim().parse::<u64>().map_err(|_| bad())?,
        ),
        None => (s.parse::<u64>().map_err(|_| bad())?, 1),
    };
    if d == 0 || n > d || d > 1_000_000 {
        return Err(bad());
    }
    let g = gcd(n, d);
    Ok((n / g, d / g))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a.max(1) } else { gcd(b, a % b) }
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
    /// Present when the run was split across runners and this is one runner's share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<Part>,
    /// What decoding changed in the message (NUL characters replaced), for the run's
    /// warnings. Never part of the message itself.
    #[serde(skip)]
    pub decode_warnings: Vec<String>,
}

impl RunCompleted {
    /// Decodes a message body of any version this worker knows.
    pub fn decode(body: &[u8]) -> Result<Self, MessageError> {
        let msg = match Self::read_plain(body) {
            Some(msg) => msg,
            None => Self::read_through_tree(body)?,
        };
        msg.checked()
    }

    /// A version 1 message without NUL read straight into the struct, without the
    /// tree, the common case. Only the escape `\u0000`
    /// can write a NUL in JSON, so a body without those six bytes has none. `None` for
    /// anything else (a NUL, another version, a key written twice, a field of the wrong
    /// type), which the tree's path reads or refuses with the errors it always gave.
    fn read_plain(body: &[u8]) -> Option<Self> {
        if memchr::memmem::find(body, br"\u0000").is_some() {
            return None;
        }
        serde_json::from_slice::<Self>(body)
            .ok()
            .filter(|msg| msg.schema_version == 1)
    }

    /// The message as a tree first: its version read before its shape is, and NUL
    /// characters replaced (with a warning) before the struct is read from it.
    fn read_through_tree(body: &[u8]) -> Result<Self, MessageError> {
        let mut value: Value =
            serde_json::from_slice(body).map_err(|e| MessageError::NotJson(e.to_string()))?;
        let version = value
            .get("schema_version")
            .and_then(Value::as_i64)
            .ok_or(MessageError::NoVersion)?;
        if version != 1 {
            return Err(MessageError::UnknownVersion(version));
        }
        // PostgreSQL text and jsonb cannot hold NUL: replaced like in summaries, so a
        // NUL in a location, a version or deep in metadata does not cost the run.
        let nul = replace_nul(&mut value);
        let mut msg: Self =
            serde_json::from_value(value).map_err(|e| MessageError::Invalid(e.to_string()))?;
        msg.decode_warnings = nul.warnings("message");
        Ok(msg)
    }

    /// The checks serde cannot make: dates PostgreSQL can store and in order, a location
    /// that fits its column, a split run's part within bounds.
    fn checked(self) -> Result<Self, MessageError> {
        for (name, at) in [
            ("started_at", Some(self.started_at)),
            ("completed_at", self.completed_at),
        ] {
            if let Some(at) = at.filter(|t| t.year() < 1) {
                return Err(MessageError::Invalid(format!(
                    "{name} {at} is before the year 1 (PostgreSQL cannot store it)"
                )));
            }
        }
        if let Some(loc) = &self.location {
            if loc.chars().count() > 50 {
                return Err(MessageError::Invalid(format!(
                    "location is longer than 50 characters: {loc:?}"
                )));
            }
        }
        if let Some(part) = &self.part {
            part.validate().map_err(MessageError::Invalid)?;
        }
        if let Some(done) = self.completed_at {
            if done < self.started_at {
                return Err(MessageError::Invalid(
                    "completed_at is before started_at".into(),
                ));
            }
        }
        Ok(self)
    }

    /// Run duration from the message's own timestamps, for runs without a summary.
    pub fn wall_duration_ms(&self) -> Option<i64> {
        self.completed_at
            .map(|c| (c - self.started_at).num_milliseconds())
    }
}

/// What [`replace_nul`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NulReplaced {
    /// NUL characters replaced by U+FFFD, in strings and object keys.
    pub count: usize,
    /// Object keys that became equal to another key of the same object once their NUL
    /// characters were replaced; the later entry is kept, as for a key written twice.
    pub collisions: Vec<String>,
}

impl NulReplaced {
    /// The warnings to keep on the run, naming `what` was changed.
    pub fn warnings(&self, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.count > 0 {
            out.push(format!(
                "{what}: {} NUL character(s) replaced by U+FFFD (PostgreSQL text cannot hold NUL)",
                self.count
            ));
        }
        for key in &self.collisions {
            out.push(format!(
                "{what}: key {key:?} appears twice once NUL characters are replaced; the last occurrence is kept"
            ));
        }
        out
    }
}

/// Replaces NUL characters in every string and object key of `v` with U+FFFD: k6 allows
/// them in names, and PostgreSQL text and jsonb cannot store them.
pub fn replace_nul(v: &mut Value) -> NulReplaced {
    let mut out = NulReplaced::default();
    replace_nul_into(v, &mut out);
    out
}

fn replace_nul_into(v: &mut Value, out: &mut NulReplaced) {
    match v {
        Value::String(s) if s.contains('\0') => {
            out.count += s.matches('\0').count();
            *s = s.replace('\0', "\u{FFFD}");
        }
        Value::Array(a) => a.iter_mut().for_each(|v| replace_nul_into(v, out)),
        Value::Object(o) => {
            if o.keys().any(|k| k.contains('\0')) {
                let entries: Vec<(String, Value)> = std::mem::take(o).into_iter().collect();
                for (k, val) in entries {
                    out.count += k.matches('\0').count();
                    let key = k.replace('\0', "\u{FFFD}");
                    // Document order is kept (serde_json's preserve_order): the later
                    // entry replaces the earlier, in the earlier one's place.
                    if o.insert(key.clone(), val).is_some() {
                        out.collisions.push(key);
                    }
                }
            }
            o.values_mut().for_each(|v| replace_nul_into(v, out));
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_from_execution_segments_as_k6_operator_passes_them() {
        let seq = "0,1/4,2/4,3/4,1";
        for (i, seg) in ["0:1/4", "1/4:2/4", "2/4:3/4", "3/4:1"].iter().enumerate() {
            let p = Part::from_execution_segment(seg, Some(seq)).unwrap();
            assert_eq!((p.index, p.count), (i as u32, 4), "{seg}");
            let p = Part::from_execution_segment(seg, None).unwrap();
            assert_eq!((p.index, p.count), (i as u32, 4), "{seg} without sequence");
        }
        // unequal segments need the sequence
        let p = Part::from_execution_segment("1/3:1", Some("0,1/3,1")).unwrap();
        assert_eq!((p.index, p.count), (1, 2));
        assert!(Part::from_execution_segment("1/3:1", None).is_err());
        assert!(Part::from_execution_segment("1/4:2/4", Some("0,1/2,1")).is_err());
        assert!(Part::from_execution_segment("2/4:1/4", None).is_err());
        assert!(Part::from_execution_segment("x", None).is_err());
    }

    #[test]
    fn a_part_must_be_one_of_its_count() {
        let mut v = valid();
        v["part"] = serde_json::json!({"index": 4, "count": 4});
        let e = RunCompleted::decode(v.to_string().as_bytes()).unwrap_err();
        assert!(e.to_string().contains("part.index 4"), "{e}");
        v["part"] = serde_json::json!({"index": 0, "count": 0});
        assert!(RunCompleted::decode(v.to_string().as_bytes()).is_err());
        v["part"] = serde_json::json!({"index": 1, "count": 2, "runner": "k6-sample-2"});
        let m = RunCompleted::decode(v.to_string().as_bytes()).unwrap();
        assert_eq!(m.part.unwrap().runner.as_deref(), Some("k6-sample-2"));
    }

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
    fn nul_is_replaced_everywhere_with_a_warning() {
        let mut v = valid();
        v["location"] = "us\u{0}east".into();
        v["metadata"] =
            serde_json::json!({"a\u{0}": ["\u{0}"], "a\u{FFFD}": 1, "b": {"c\u{0}": "d"}});
        let m = RunCompleted::decode(v.to_string().as_bytes()).unwrap();
        assert_eq!(m.location.as_deref(), Some("us\u{FFFD}east"));
        // "a\0" and "a\u{FFFD}" collide: the later entry (1) is kept, and the NUL in the
        // dropped value is not counted.
        assert_eq!(
            m.metadata,
            Some(serde_json::json!({"a\u{FFFD}": 1, "b": {"c\u{FFFD}": "d"}}))
        );
        assert_eq!(
            m.decode_warnings,
            vec![
                "message: 3 NUL character(s) replaced by U+FFFD (PostgreSQL text cannot hold NUL)"
                    .to_string(),
                "message: key \"a\u{FFFD}\" appears twice once NUL characters are replaced; the last occurrence is kept".to_string(),
            ]
        );
        let clean = RunCompleted::decode(valid().to_string().as_bytes()).unwrap();
        assert!(clean.decode_warnings.is_empty());
    }

    #[test]
    fn timestamps_before_the_year_1_are_refused() {
        let mut v = valid();
        v["started_at"] = "-0001-01-01T00:00:00Z".into();
        let err = RunCompleted::decode(v.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("started_at"), "{err}");
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

    /// The plain path reads what the tree's path reads, for every bundled fixture's
    /// message; where they could differ (a key written twice, an escaped backslash before
    /// `u0000`, a version in another type) the plain path steps aside.
    #[test]
    fn the_plain_path_reads_what_the_tree_reads() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6");
        let mut bodies = Vec::new();
        for version in std::fs::read_dir(&root).unwrap() {
            let version = version.unwrap().path();
            if !version.is_dir() {
                continue;
            }
            for case in std::fs::read_dir(version).unwrap() {
                let path = case.unwrap().path().join("message.json");
                if let Ok(body) = std::fs::read(&path) {
                    bodies.push(body);
                }
            }
        }
        assert!(bodies.len() >= 20, "{} fixture messages", bodies.len());
        for body in &bodies {
            let plain = RunCompleted::read_plain(body).expect("a fixture message reads plainly");
            assert_eq!(plain, RunCompleted::read_through_tree(body).unwrap());
        }

        let text = valid().to_string();
        let twice = text.replacen("{", r#"{"location":"first","#, 1);
        assert!(RunCompleted::read_plain(twice.as_bytes()).is_none());
        assert_eq!(
            RunCompleted::decode(twice.as_bytes()).unwrap(),
            RunCompleted::read_through_tree(twice.as_bytes()).unwrap()
        );
        let mut v = valid();
        v["location"] = r"\u0000".into();
        let backslash = v.to_string();
        assert!(RunCompleted::read_plain(backslash.as_bytes()).is_none());
        let m = RunCompleted::decode(backslash.as_bytes()).unwrap();
        assert_eq!(m.location.as_deref(), Some(r"\u0000"));
        assert!(m.decode_warnings.is_empty(), "{:?}", m.decode_warnings);
        let mut v = valid();
        v["schema_version"] = 2.into();
        assert!(RunCompleted::read_plain(v.to_string().as_bytes()).is_none());
        assert!(matches!(
            RunCompleted::decode(v.to_string().as_bytes()),
            Err(MessageError::UnknownVersion(2))
        ));
    }
}
