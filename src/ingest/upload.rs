//! The upload step: a run's artifacts go to S3 at once, under deterministic keys (a
//! retry overwrites), and each becomes an [`ArtifactRecord`] in `runs.artifact_paths`.

use serde::Serialize;
use serde_json::Value;
use uuid::Uuid;

use super::steps::{ArtifactRole, FetchedArtifact, SummaryLoad};
use super::{IngestError, Ingestor};
use crate::artifact::{LocalArtifact, redact_uri};
use crate::fault::Fault;
use crate::message::RunCompleted;
use crate::s3::{UploadError, content_type_for};

/// Where one artifact of a run came from and where it is kept: one entry of
/// `runs.artifact_paths` (and of a part's), keyed by its role.
#[derive(Debug, Clone, Serialize)]
pub struct ArtifactRecord {
    #[serde(skip)]
    pub role: ArtifactRole,
    /// The URI the message gave, redacted.
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<String>,
    /// The summary is in `summary_json` rather than in S3.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub inline: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// The summary could not be parsed; the S3 copy is there for a person to look at.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub unreadable: bool,
}

/// What this attempt put in S3: the objects' URIs and the bytes sent.
#[derive(Default)]
pub(super) struct Uploads {
    pub uris: Vec<String>,
    pub bytes: u64,
}

/// The upload step's result: a record per artifact, the summary document when it is
/// inlined, and this attempt's objects (removed if the write is refused for good).
pub(super) struct Uploaded {
    pub records: Vec<ArtifactRecord>,
    pub summary_json: Option<Value>,
    pub objects: Uploads,
}

impl Uploaded {
    /// `runs.artifact_paths`: each record under its role.
    pub fn artifact_paths(&self) -> Value {
        let mut records: Vec<&ArtifactRecord> = self.records.iter().collect();
        records.sort_by_key(|r| r.role.as_str());
        Value::Object(
            records
                .into_iter()
                .map(|r| {
                    let v = serde_json::to_value(r).unwrap_or(Value::Null);
                    (r.role.as_str().to_string(), v)
                })
                .collect(),
        )
    }

    /// The S3 copy of an artifact; for the summary only a readable one counts.
    pub fn s3_of(&self, role: ArtifactRole) -> Option<String> {
        self.records
            .iter()
            .find(|r| r.role == role && !r.unreadable)
            .and_then(|r| r.s3.clone())
    }
}

/// What an upload sends: a local file, streamed, or a small document already in memory.
enum Body<'a> {
    File(&'a LocalArtifact),
    Bytes(Vec<u8>),
}

/// One object to put, with the record it becomes.
struct Put<'a> {
    name: String,
    body: Body<'a>,
    record: ArtifactRecord,
}

impl Ingestor {
    /// Uploads the run's artifacts concurrently. `prefix` starts every object's name (a
    /// part's `part-<index>-`). When an upload fails for good, this attempt's objects,
    /// the failed ones too, are removed unless a stored row refers to them.
    pub(super) async fn upload(
        &self,
        msg: &RunCompleted,
        summary: SummaryLoad,
        artifacts: &mut [FetchedArtifact],
        prefix: &str,
    ) -> Result<Uploaded, IngestError> {
        let (puts, mut records, summary_json) = plan(msg, summary, artifacts, prefix);
        let sent = futures_util::future::join_all(puts.into_iter().map(|p| self.put(msg, p))).await;
        let mut objects = Uploads::default();
        let mut failed: Option<UploadError> = None;
        for (uri, result) in sent {
            objects.uris.push(uri);
            match result {
                Ok((record, n)) => {
                    objects.bytes += n;
                    records.push(record);
                }
                Err(e) => {
                    // A permanent failure wins: the message ends in the dead-letter queue.
                    if failed.as_ref().is_none_or(|f| f.fault().is_retryable()) {
                        failed = Some(e);
                    }
                }
            }
        }
        let Some(source) = failed else {
            return Ok(Uploaded {
                records,
                summary_json,
                objects,
            });
        };
        // A transient failure deletes nothing: it is retried under the same keys, and a
        // concurrent duplicate may be about to commit rows referring to them. A permanent
        // one removes them all, the failed keys too (some stores keep part of a failed
        // upload).
        if source.fault() == Fault::Permanent {
            self.remove_unreferenced(msg.run_id, &objects).await;
        }
        Err(IngestError::Upload {
            run_id: msg.run_id,
            source,
        })
    }

    /// Puts one object; returns its URI whatever happened, and its record and size.
    async fn put(
        &self,
        msg: &RunCompleted,
        p: Put<'_>,
    ) -> (String, Result<(ArtifactRecord, u64), UploadError>) {
        let store = &self.store;
        let key = store.key_for(msg.organization_id, msg.project_id, msg.run_id, &p.name);
        let content_type = content_type_for(&p.name);
        let sent = match p.body {
            Body::File(local) => store.upload_file(&local.path, &key, content_type).await,
            Body::Bytes(bytes) => store.upload_bytes(bytes, &key, content_type).await,
        };
        let uri = store.uri(&key);
        let mut record = p.record;
        record.s3 = Some(uri.clone());
        (uri, sent.map(|n| (record, n)))
    }

    /// Deletes this attempt's uploads that no committed row of the run refers to. Best
    /// effort: when the rows cannot be read, or a delete fails, objects stay (and a
    /// warning says which), since deleting one a row refers to would lose data.
    pub(super) async fn remove_unreferenced(&self, run_id: Uuid, uploads: &Uploads) {
        if uploads.uris.is_empty() {
            return;
        }
        let referenced = match self.db.referenced_s3_uris(run_id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, objects = uploads.uris.len(),
                    "cannot tell which uploads a stored row refers to; leaving them in S3");
                return;
            }
        };
        let keys: Vec<String> = uploads
            .uris
            .iter()
            .filter(|u| !referenced.contains(u))
            .filter_map(|u| self.store.key_of(u).map(str::to_string))
            .collect();
        for e in self.store.delete_objects(&keys).await {
            tracing::warn!(error = %e, "could not delete an upload no row refers to");
        }
        if !keys.is_empty() {
            tracing::info!(objects = keys.len(), "deleted uploads no row refers to");
        }
    }
}

/// The objects to put, in the order names are given (the files, then the summary), the
/// records that need no upload, and the summary document when it is inlined.
fn plan<'a>(
    msg: &RunCompleted,
    summary: SummaryLoad,
    artifacts: &'a mut [FetchedArtifact],
    prefix: &str,
) -> (Vec<Put<'a>>, Vec<ArtifactRecord>, Option<Value>) {
    let mut taken = Vec::new();
    let mut puts: Vec<Put<'a>> = artifacts
        .iter_mut()
        .map(|a| Put {
            name: unique_name(&format!("{prefix}{}", a.file_name), a.role, &mut taken),
            // A small file the fetch read goes from memory: no second read.
            body: match a.bytes.take() {
                Some(bytes) => Body::Bytes(bytes),
                None => Body::File(&a.local),
            },
            record: record(a.role, a.source_uri.clone(), Some(a.local.size)),
        })
        .collect();
    let source = msg
        .artifacts
        .summary
        .as_deref()
        .map(redact_uri)
        .unwrap_or_default();
    let (put, inline, summary_json) = plan_summary(summary, source);
    puts.extend(put.map(|(file_name, bytes, record)| Put {
        name: unique_name(
            &format!("{prefix}{file_name}"),
            ArtifactRole::Summary,
            &mut taken,
        ),
        body: Body::Bytes(bytes),
        record,
    }));
    (puts, inline, summary_json)
}

/// The summary's part of [`plan`]: its file to put (name, bytes, record) when it goes
/// to S3, its record when it is inlined, and its document then.
type SummaryPlan = (
    Option<(String, Vec<u8>, ArtifactRecord)>,
    Vec<ArtifactRecord>,
    Option<Value>,
);

fn plan_summary(summary: SummaryLoad, source: String) -> SummaryPlan {
    match summary {
        SummaryLoad::Parsed {
            size,
            doc: Some(doc),
            ..
        } => {
            let mut r = record(ArtifactRole::Summary, source, Some(size));
            r.inline = true;
            (None, vec![r], Some(doc))
        }
        SummaryLoad::Parsed {
            size,
            doc: None,
            file_name,
            bytes,
            ..
        } => {
            let r = record(ArtifactRole::Summary, source, Some(size));
            (Some((file_name, bytes, r)), Vec::new(), None)
        }
        SummaryLoad::Unreadable {
            bytes, file_name, ..
        } => {
            // Kept where a person can look at it.
            let mut r = record(ArtifactRole::Summary, source, None);
            r.unreadable = true;
            (Some((file_name, bytes, r)), Vec::new(), None)
        }
        SummaryLoad::Missing { .. } => (None, Vec::new(), None),
    }
}

fn record(role: ArtifactRole, source: String, bytes: Option<u64>) -> ArtifactRecord {
    ArtifactRecord {
        role,
        source,
        s3: None,
        inline: false,
        bytes,
        unreadable: false,
    }
}

/// A file name unique among this run's artifacts (two roles may share a source name).
fn unique_name(name: &str, role: ArtifactRole, taken: &mut Vec<String>) -> String {
    let base = if name.is_empty() {
        role.as_str().to_string()
    } else {
        name.to_string()
    };
    let name = if taken.contains(&base) {
        format!("{role}-{base}")
    } else {
        base
    };
    taken.push(name.clone());
    name
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn uploaded(records: Vec<ArtifactRecord>) -> Uploaded {
        Uploaded {
            records,
            summary_json: None,
            objects: Uploads::default(),
        }
    }

    #[test]
    fn artifact_paths_keep_their_published_shape() {
        let mut logs = record(ArtifactRole::Logs, "file:///r/k6.log".into(), Some(10));
        logs.s3 = Some("s3://b/k/k6.log".into());
        let mut inline = record(ArtifactRole::Summary, "summary.json".into(), Some(5));
        inline.inline = true;
        let paths = uploaded(vec![inline, logs]).artifact_paths();
        assert_eq!(
            serde_json::to_string(&paths).unwrap(),
            json!({
                "logs": {"source": "file:///r/k6.log", "s3": "s3://b/k/k6.log", "bytes": 10},
                "summary": {"source": "summary.json", "inline": true, "bytes": 5},
            })
            .to_string()
        );

        let mut unreadable = record(ArtifactRole::Summary, "s.json".into(), None);
        unreadable.s3 = Some("s3://b/k/s.json".into());
        unreadable.unreadable = true;
        let up = uploaded(vec![unreadable]);
        assert_eq!(
            up.artifact_paths(),
            json!({"summary": {"source": "s.json", "s3": "s3://b/k/s.json", "unreadable": true}})
        );
        // An unreadable summary's copy is not the run's summary.
        assert_eq!(up.s3_of(ArtifactRole::Summary), None);
    }

    #[test]
    fn names_stay_unique_among_a_runs_artifacts() {
        let mut taken = Vec::new();
        assert_eq!(
            unique_name("k6.log", ArtifactRole::Logs, &mut taken),
            "k6.log"
        );
        assert_eq!(
            unique_name("k6.log", ArtifactRole::Metrics, &mut taken),
            "metrics-k6.log"
        );
        assert_eq!(
            unique_name("", ArtifactRole::ReportHtml, &mut taken),
            "report_html"
        );
    }
}
