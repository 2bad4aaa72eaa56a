//! One runner's part of a split run (SPEC section 12), and the merge of all parts.
//!
//! A part is fetched, extracted and uploaded like a whole run (its artifacts under
//! `part-<index>-<name>` in the run's folder), then stored in `k6_run_parts` in a
//! transaction that locks the run's `runs` row. When that transaction sees all `count`
//! parts, it merges them ([`crate::summary::merge`]) and writes the run's
//! `k6_performance_runs` and detail rows before it commits: the last part and the merged
//! run are one commit, and a crash in between loses nothing (the part is redelivered).
//!
//! The merge folds the parts one at a time into a [`MergeAcc`]: each stored part's
//! summary is read by a query of its own (or from its S3 copy), parsed, folded and
//! dropped before the next, so a merge holds one part's summary and the accumulator
//! (bounded by the union caps) whatever the number of parts.
//!
//! Percentiles of the merge come from every part's raw samples, read again from the
//! worker's own S3 copies (the arriving part's from its local file) into bounded sorted
//! runs, joined with `SortedSamples::merge`: memory is bounded by
//! `fetch.samples_buffer_bytes` per part whatever the sample counts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::steps::{ArtifactRole, Extracted};
use super::store::refuses_every_attempt;
use super::upload::Uploaded;
use super::{IngestContext, IngestError, IngestReport, Ingestor, Outcome, RunLine};
use crate::artifact::{LocalArtifact, Source, open_lines_capped};
use crate::db::parts::{
    MERGED_PARTS_KEY, NewPart, PartState, PartWrite, RunIdentity, StoredPart, merged_label,
};
use crate::db::{Db, NewRun, StoreError, Stored};
use crate::fault::ReasonClass;
use crate::message::{Artifacts, Part, RunCompleted, Trigger};
use crate::summary::merge::{MergeAcc, Merged};
use crate::summary::parse::parse_summary_owned;
use crate::summary::samples::{SampleRequest, collect_sorted_with};
use crate::summary::sink::SortedSamples;
use crate::summary::{
    Extraction, RunStatus, Summary, ValueSource, extract, extract_without_summary,
};

/// The file name of a merged summary too large to inline, in the run's S3 folder.
const MERGED_SUMMARY_NAME: &str = "merged-summary.json";

/// What `summary_json` (or the merged summary's S3 object) holds for a merged run.
#[derive(serde::Serialize)]
struct MergedDocument<'a> {
    merged_from_parts: &'a str,
    summary: &'a Summary,
}

/// Counts the bytes written to it: a document's size, without the document.
struct ByteCount(u64);

impl std::io::Write for ByteCount {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The arriving part's raw samples, still in a local file. Its summary is not kept: the
/// merge reads it back from the row just stored like every other part's, so no part's
/// parsed summary is held while another is folded.
struct Current {
    index: u32,
    metrics: Option<PathBuf>,
}

/// What the merge writes, for the report.
struct MergeOutcome {
    extraction: Extraction,
    stored: Stored,
}

impl Ingestor {
    /// The path of a message with a `part`: the shared steps, then the part's own store.
    pub(super) async fn ingest_part(
        &self,
        msg: &RunCompleted,
        part: &Part,
        ctx: &IngestContext,
    ) -> Result<IngestReport, IngestError> {
        let run_id = msg.run_id;
        self.prior_record(msg).await?;
        // A part stored before: nothing to fetch; only a merge may still be due (when
        // the transaction that stored it was the one that saw it complete, the merge is
        // already there).
        let stored_before = self
            .db
            .part_stored(run_id, part.index)
            .await
            .map_err(|e| IngestError::store(run_id, e))?;
        if stored_before == Some(true) {
            return self.part_again(&self.db, msg, part).await;
        }
        let mut fetched = self.prepare.fetch(msg, ctx).await?;
        if stored_before == Some(false) && !fetched.has_summary() {
            // stored as error before, and still without a summary: nothing new
            return self.part_again(&self.db, msg, part).await;
        }
        let extracted = self.prepare.extract(msg, &mut fetched).await?;
        let current = Current {
            index: part.index,
            metrics: fetched.metrics_file().map(Path::to_path_buf),
        };
        let prefix = format!("part-{}-", part.index);
        let uploaded = self
            .upload(msg, fetched.summary, &mut fetched.artifacts, &prefix)
            .await?;
        // `fetched.artifacts` (the local metrics file the merge reads) lives until here.
        self.store_and_merge(msg, part, extracted, uploaded, current)
            .await
    }

    /// Stores the part (and the merge, when it completes the run) and reports it.
    async fn store_and_merge(
        &self,
        msg: &RunCompleted,
        part: &Part,
        extracted: Extracted,
        uploaded: Uploaded,
        current: Current,
    ) -> Result<IngestReport, IngestError> {
        let run_id = msg.run_id;
        let unusable = extracted.unusable(msg);
        let Extracted {
            mut extraction,
            summary_reason,
        } = extracted;
        let new = NewPart {
            msg,
            part,
            status: extraction.columns.status.as_str(),
            columns: serde_json::to_value(&extraction.columns).unwrap_or(Value::Null),
            artifact_paths: uploaded.artifact_paths(),
            summary_s3_url: uploaded.s3_of(ArtifactRole::Summary),
            metrics_s3_url: uploaded.s3_of(ArtifactRole::Metrics),
            summary_json: uploaded.summary_json,
            error_details: extraction.status_details.clone().or(summary_reason),
        };
        // A part keeps only its columns, not its detail rows: free them before the
        // merge this transaction may run.
        extraction.metrics = Vec::new();
        extraction.thresholds = Vec::new();
        extraction.checks = Vec::new();
        let objects = uploaded.objects;
        let result = self
            .store_part(&self.db, msg, part, new, Some(current))
            .await;
        release_freed_memory();
        let (outcome, merged) = match result {
            Ok(v) => v,
            Err(e) => {
                if refuses_every_attempt(&e) {
                    self.remove_unreferenced(run_id, &objects).await;
                }
                return Err(IngestError::store(run_id, e));
            }
        };
        Ok(part_report(
            run_id,
            outcome,
            merged.as_ref(),
            extraction,
            unusable,
            objects.bytes,
        ))
    }

    /// A part already stored: merge if that is still due (it is not, unless the merge
    /// itself failed for good earlier), else report what is stored.
    async fn part_again(
        &self,
        db: &Db,
        msg: &RunCompleted,
        part: &Part,
    ) -> Result<IngestReport, IngestError> {
        let run_id = msg.run_id;
        let store_err = |source| IngestError::Store { run_id, source };
        let mut tx = db.begin_part(msg).await.map_err(store_err)?;
        let state = db
            .part_state(&mut tx, run_id)
            .await
            .map_err(|e| store_err(e.into()))?;
        let count = state.parts.first().map_or(part.count, |p| p.count);
        if state.merge_due(count) {
            let merged = self
                .merge_in(db, &mut tx, msg, &state, None, None)
                .await
                .map_err(store_err)?;
            tx.commit().await.map_err(|e| store_err(e.into()))?;
            return Ok(IngestReport {
                run_id,
                outcome: Outcome::Ingested,
                line: RunLine::from_extraction(&merged.extraction),
                bytes_uploaded: 0,
                warnings: merged.extraction.columns.warnings,
                reason: None,
            });
        }
        tx.rollback().await.map_err(|e| store_err(e.into()))?;
        self.already_present(run_id).await
    }

    /// The part's transaction: lock the run, store the part, merge when it completes.
    async fn store_part(
        &self,
        db: &Db,
        msg: &RunCompleted,
        part: &Part,
        new: NewPart<'_>,
        current: Option<Current>,
    ) -> Result<(Outcome, Option<MergeOutcome>), StoreError> {
        let mut tx = db.begin_part(msg).await?;
        let before = db.part_state(&mut tx, msg.run_id).await?;
        if let Some(first) = before.parts.first() {
            if first.count != part.count {
                return Err(StoreError::Refused {
                    step: "k6_run_parts",
                    source: sqlx::Error::Protocol(format!(
                        "part {}/{} of a run whose stored parts say {} parts",
                        part.index, part.count, first.count
                    )),
                });
            }
        }
        let write = db.insert_part(&mut tx, &new).await?;
        // The part's own document is stored; the merge reads what it needs part by part.
        drop(new);
        let state = db.part_state(&mut tx, msg.run_id).await?;
        // A part that replaced its error record changes a merge already written.
        let complete = state.parts.len() as u32 == part.count;
        let merged = if state.merge_due(part.count) || (complete && write == PartWrite::Replaced) {
            Some(
                self.merge_in(db, &mut tx, msg, &state, current, None)
                    .await?,
            )
        } else {
            None
        };
        tx.commit().await?;
        let outcome = match (&merged, write) {
            (Some(m), _) if matches!(m.stored, Stored::Replaced { .. }) => Outcome::Replaced,
            (_, PartWrite::Replaced) => Outcome::Replaced,
            (_, PartWrite::Inserted) => Outcome::Ingested,
            (_, PartWrite::Kept) => Outcome::AlreadyPresent,
        };
        Ok((outcome, merged))
    }

    /// Merges the stored parts and writes the run's rows in `tx`. `incomplete` is the
    /// reason a run that misses parts is recorded as `error` with what arrived.
    async fn merge_in(
        &self,
        db: &Db,
        tx: &mut Transaction<'_, Postgres>,
        msg: &RunCompleted,
        state: &PartState,
        current: Option<Current>,
        incomplete: Option<String>,
    ) -> Result<MergeOutcome, StoreError> {
        let count = state.parts.first().map_or(1, |p| p.count);
        let label = merged_label(state.parts.len() as u32, count);
        let (mut acc, with_summary) = self.fold_summaries(db, tx, msg.run_id, state).await?;
        self.fold_samples(&mut acc, &with_summary, state.parts.len(), current.as_ref())
            .await;
        let merged = tokio::task::spawn_blocking(move || acc.finish())
            .await
            .map_err(|e| StoreError::Db(sqlx::Error::Protocol(format!("merge task failed: {e}"))))?
            .map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
        let run_msg = merged_run_message(msg, state, merged.exit_code);
        let (extraction, summary) = merged_extraction(merged, incomplete, &label);
        let has_summary = summary.is_some();
        let (summary_text, summary_s3_url) = match &summary {
            Some(s) => self.merged_summary_document(msg, &label, s).await?,
            None => (None, None),
        };
        // The write needs only the document (or its URL) and the extraction.
        drop(summary);
        release_freed_memory();
        let duration_ms = extraction
            .columns
            .duration_ms
            .or_else(|| run_msg.wall_duration_ms());
        let new = NewRun {
            msg: &run_msg,
            extraction: &extraction,
            has_summary,
            duration_ms,
            artifact_paths: parts_paths(state),
            logs_s3_url: None,
            summary_json: None,
            summary_s3_url,
        };
        let stored = db.write_merged(tx, &new, summary_text.as_deref()).await?;
        Ok(MergeOutcome { extraction, stored })
    }

    /// Folds the stored parts' summaries, one at a time: each is loaded (its own query,
    /// or its S3 copy), folded into the accumulator and dropped before the next is
    /// read. Returns the accumulator and the parts that had a summary.
    async fn fold_summaries<'s>(
        &self,
        db: &Db,
        tx: &mut Transaction<'_, Postgres>,
        run_id: Uuid,
        state: &'s PartState,
    ) -> Result<(MergeAcc, Vec<&'s StoredPart>), StoreError> {
        release_freed_memory();
        let mut acc = MergeAcc::new(self.prepare.summary_limits());
        let mut with_summary = Vec::with_capacity(state.parts.len());
        for p in &state.parts {
            let (summary, reason) = self.stored_summary(db, tx, run_id, p).await?;
            if summary.is_some() {
                with_summary.push(p);
            }
            acc.add_part(
                p.index,
                p.exit_code,
                summary.as_deref(),
                reason.or_else(|| p.error_details.clone()),
            );
            drop(summary);
            release_freed_memory();
        }
        Ok((acc, with_summary))
    }

    /// Adds the raw samples of each part with a summary (the arriving part's from its
    /// local file, the others' from the worker's S3 copies), or why it has none.
    async fn fold_samples(
        &self,
        acc: &mut MergeAcc,
        with_summary: &[&StoredPart],
        parts: usize,
        current: Option<&Current>,
    ) {
        let requests: Vec<SampleRequest> = acc
            .sample_keys()
            .into_iter()
            .map(|(key, base_name, tags)| SampleRequest {
                key,
                base_name,
                tags,
                percentiles: Vec::new(),
            })
            .collect();
        for p in with_summary {
            if requests.is_empty() {
                acc.add_samples(p.index, Err("no raw samples".into()));
                continue;
            }
            let own = current.filter(|c| c.index == p.index);
            let samples = self
                .part_samples(p, own.and_then(|c| c.metrics.clone()), &requests, parts)
                .await;
            acc.add_samples(p.index, samples);
        }
    }

    /// The merged summary's document, `{"merged_from_parts": "4 of 4", "summary": ...}`,
    /// serialized straight from the summary (no JSON tree of it is built). Inlined up
    /// to `s3.inline_summary_max_bytes` like a whole run's summary; a larger one is
    /// written to a temporary file, never held whole in memory, and uploaded under the
    /// run's own key `merged-summary.json` (a merge done again overwrites it). Returns
    /// (inline text, S3 URL).
    async fn merged_summary_document(
        &self,
        msg: &RunCompleted,
        label: &str,
        summary: &Summary,
    ) -> Result<(Option<String>, Option<String>), StoreError> {
        let doc = MergedDocument {
            merged_from_parts: label,
            summary,
        };
        let failed = |e: String| {
            // Retried like a failed write: the part's transaction is rolled back and the
            // message redelivered (or the sweep runs again).
            StoreError::Db(sqlx::Error::Io(std::io::Error::other(format!(
                "merged summary not stored: {e}"
            ))))
        };
        let mut size = ByteCount(0);
        serde_json::to_writer(&mut size, &doc).map_err(|e| failed(e.to_string()))?;
        let store = &self.store;
        if size.0 <= self.prepare.inline_summary_max() {
            let text = serde_json::to_string(&doc).map_err(|e| failed(e.to_string()))?;
            return Ok((Some(text), None));
        }
        let file = tempfile::NamedTempFile::new().map_err(|e| failed(e.to_string()))?;
        let mut out = std::io::BufWriter::new(file.as_file());
        serde_json::to_writer(&mut out, &doc).map_err(|e| failed(e.to_string()))?;
        std::io::Write::flush(&mut out).map_err(|e| failed(e.to_string()))?;
        drop(out);
        let key = store.key_for(
            msg.organization_id,
            msg.project_id,
            msg.run_id,
            MERGED_SUMMARY_NAME,
        );
        store
            .upload_file(file.path(), &key, "application/json")
            .await
            .map_err(|e| failed(e.to_string()))?;
        Ok((None, Some(store.uri(&key))))
    }

    /// A stored part's summary: inline (read by a query of its own, so one part's
    /// document is in memory at a time), or read back from the worker's S3 copy. The
    /// second value says why a part that should have one has none.
    async fn stored_summary(
        &self,
        db: &Db,
        tx: &mut Transaction<'_, Postgres>,
        run_id: Uuid,
        p: &StoredPart,
    ) -> Result<(Option<Arc<Summary>>, Option<String>), StoreError> {
        let inline = if p.has_inline_summary {
            db.part_summary_json(tx, run_id, p.index).await?
        } else {
            None
        };
        let doc = match (inline, &p.summary_s3_url) {
            (Some(doc), _) => doc,
            (None, Some(uri)) => {
                let Some(source) = s3_source(uri) else {
                    return Ok((None, Some(format!("summary {uri} is not an s3:// URI"))));
                };
                match self.prepare.fetcher().fetch_summary(uri, &source).await {
                    Ok(bytes) => match serde_json::from_slice(&bytes) {
                        Ok(v) => v,
                        Err(e) => return Ok((None, Some(format!("summary {uri}: {e}")))),
                    },
                    Err(e) => return Ok((None, Some(format!("summary {uri}: {e}")))),
                }
            }
            (None, None) => return Ok((None, None)),
        };
        Ok(match parse_summary_owned(doc) {
            Ok(s) => (Some(Arc::new(s)), None),
            Err(e) => (None, Some(format!("summary: {e}"))),
        })
    }

    /// A part's sorted samples for `requests`, or why there are none.
    async fn part_samples(
        &self,
        p: &StoredPart,
        local: Option<PathBuf>,
        requests: &[SampleRequest],
        parts: usize,
    ) -> Result<HashMap<String, SortedSamples>, String> {
        let settings = self.prepare.fetcher().settings();
        let mut limits = settings.sample_limits();
        // Sorted samples a part could keep in memory stay there until the merge walk:
        // the parts share one buffer, so a merge holds no more than a whole run would.
        limits.buffer_bytes /= parts.max(1);
        let max_inflated = settings.max_samples_inflated_bytes;
        let (path, _keep): (PathBuf, Option<LocalArtifact>) = match local {
            Some(path) => (path, None),
            None => {
                let uri = p.metrics_s3_url.as_deref().ok_or("sent no raw samples")?;
                let source = s3_source(uri).ok_or_else(|| format!("{uri} is not an s3:// URI"))?;
                let local = self
                    .prepare
                    .fetcher()
                    .fetch_to_local(uri, &source, settings.max_artifact_bytes)
                    .await
                    .map_err(|e| format!("raw samples unavailable: {e}"))?;
                (local.path.clone(), Some(local))
            }
        };
        let requests = requests.to_vec();
        let (flags, sorted) = tokio::task::spawn_blocking(move || {
            let reader = open_lines_capped(&path, max_inflated)?;
            collect_sorted_with(reader, &requests, &limits)
        })
        .await
        .map_err(|e| format!("samples reader failed: {e}"))?
        .map_err(|e| format!("raw samples not usable: {e}"))?;
        if flags.truncated {
            return Err(format!(
                "raw samples stopped at {} samples",
                limits.max_samples
            ));
        }
        Ok(sorted
            .into_iter()
            .filter(|(key, _)| {
                let base = key.split('{').next().unwrap_or(key);
                !flags.tainted.iter().any(|t| t == base)
            })
            .collect())
    }

    /// Records every split run whose parts are still missing after `wait` as `error`
    /// ("3 of 4 parts") with the merge of what arrived; a late part replaces that record
    /// with the merged run. Returns the runs recorded.
    pub async fn sweep_incomplete_parts(
        &self,
        wait: std::time::Duration,
    ) -> Result<Vec<Uuid>, StoreError> {
        let db = &self.db;
        let cutoff: DateTime<Utc> =
            Utc::now() - chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::zero());
        let mut done = Vec::new();
        for run_id in db.overdue_split_runs(cutoff, 100).await? {
            let Some((mut tx, id)) = db.begin_locked(run_id).await? else {
                continue;
            };
            let state = db.part_state(&mut tx, run_id).await?;
            let count = state.parts.first().map_or(0, |p| p.count);
            // Checked again under the lock: a part or another sweep may have come first.
            if state.has_performance_row
                || state.parts.is_empty()
                || state.parts.len() as u32 >= count
            {
                tx.rollback().await?;
                continue;
            }
            let missing: Vec<String> = (0..count)
                .filter(|i| !state.parts.iter().any(|p| p.index == *i))
                .map(|i| i.to_string())
                .collect();
            let why = format!(
                "{} of {count} parts arrived within {}s (ingest.part_wait_secs); missing part(s): {}",
                state.parts.len(),
                wait.as_secs(),
                missing.join(", ")
            );
            let msg = sweep_message(run_id, id, &state.parts[0]);
            self.merge_in(db, &mut tx, &msg, &state, None, Some(why))
                .await?;
            tx.commit().await?;
            tracing::warn!(run.id = %run_id, parts = state.parts.len(), count, "split run recorded as error: parts missing");
            done.push(run_id);
        }
        Ok(done)
    }
}

impl Ingestor {
    /// Runs [`Ingestor::sweep_incomplete_parts`] every `interval` until `shutdown`.
    pub fn spawn_part_sweep(
        &self,
        interval: std::time::Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let ingestor = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
                if let Err(e) = ingestor.sweep_incomplete_parts(ingestor.part_wait).await {
                    tracing::warn!(error = %e, "sweep of split runs with missing parts failed; retried later");
                }
            }
        })
    }
}

/// The message a sweep records an incomplete split run with: the ids of its `runs` row
/// and the times of its first part.
fn sweep_message(run_id: Uuid, id: RunIdentity, first: &StoredPart) -> RunCompleted {
    RunCompleted {
        schema_version: 1,
        event_id: Uuid::now_v7(),
        run_id,
        job_id: id.job_id,
        test_id: id.test_id.unwrap_or_default(),
        organization_id: id.organization_id,
        project_id: id.project_id,
        location: id.location,
        trigger: id
            .trigger
            .and_then(|t| serde_json::from_value::<Trigger>(Value::String(t)).ok()),
        started_at: first.started_at.unwrap_or_else(Utc::now),
        completed_at: first.completed_at,
        exit_code: None,
        k6_version: None,
        artifacts: Artifacts::default(),
        config_snapshot: None,
        metadata: None,
        part: None,
        decode_warnings: Vec::new(),
    }
}

/// The merged run's extraction, its status `error` when the merge says why or parts
/// are missing (`incomplete`), and the merged summary the run's document is made of.
fn merged_extraction(
    merged: Merged,
    incomplete: Option<String>,
    label: &str,
) -> (Extraction, Option<Summary>) {
    let mut extraction = match &merged.summary {
        Some(s) => extract(s, merged.exit_code, merged.samples.as_ref()),
        None => extract_without_summary(
            merged.exit_code,
            merged.error.as_deref().unwrap_or("no part has a summary"),
        ),
    };
    if let Some(e) = &merged.error {
        extraction.columns.status = RunStatus::Error;
        extraction.status_details = Some(e.clone());
    }
    if let Some(why) = incomplete {
        extraction.columns.status = RunStatus::Error;
        extraction.status_details = Some(why.clone());
        extraction.columns.warnings.push(why);
    }
    extraction.columns.warnings.extend(merged.warnings);
    extraction.columns.value_sources.extend(merged.sources);
    extraction.columns.value_sources.insert(
        MERGED_PARTS_KEY.into(),
        ValueSource::Merge(label.to_string()),
    );
    (extraction, merged.summary)
}

/// The message the merged run is written with: the parts' earliest start and latest
/// completion and, whatever arrived last, the lowest part's description of the run.
fn merged_run_message(
    msg: &RunCompleted,
    state: &PartState,
    exit_code: Option<i32>,
) -> RunCompleted {
    let started_at = state
        .parts
        .iter()
        .filter_map(|p| p.started_at)
        .min()
        .unwrap_or(msg.started_at);
    let completed_at = state.parts.iter().filter_map(|p| p.completed_at).max();
    let first = &state.parts[0];
    RunCompleted {
        started_at,
        completed_at: completed_at.or(msg.completed_at),
        exit_code,
        artifacts: Artifacts::default(),
        location: first.location.clone().or_else(|| msg.location.clone()),
        k6_version: first.k6_version.clone().or_else(|| msg.k6_version.clone()),
        config_snapshot: first.config_snapshot.clone(),
        metadata: first.metadata.clone(),
        part: None,
        ..msg.clone()
    }
}

/// The merged run's `artifact_paths`: each part's runner, segment, exit code, status
/// and artifacts, by index.
fn parts_paths(state: &PartState) -> Value {
    let parts: serde_json::Map<String, Value> = state
        .parts
        .iter()
        .map(|p| {
            (
                p.index.to_string(),
                json!({
                    "runner": p.runner,
                    "execution_segment": p.execution_segment,
                    "exit_code": p.exit_code,
                    "status": p.status,
                    "artifacts": p.artifact_paths,
                }),
            )
        })
        .collect();
    json!({ "parts": parts })
}

/// The report of a stored part: `stored_as_error` when its summary is unusable
/// (`unusable` says why), else the store's `outcome`.
fn part_report(
    run_id: Uuid,
    outcome: Outcome,
    merged: Option<&MergeOutcome>,
    own: Extraction,
    unusable: Option<String>,
    bytes_uploaded: u64,
) -> IngestReport {
    let (line, warnings) = part_view(merged, own);
    let (outcome, reason) = match unusable {
        Some(reason) => (
            Outcome::StoredAsError(ReasonClass::SummaryUnusable),
            Some(reason),
        ),
        None => (outcome, None),
    };
    IngestReport {
        run_id,
        outcome,
        line,
        bytes_uploaded,
        warnings,
        reason,
    }
}

/// The report's line and warnings: the merged run's line when this part completed it,
/// and the part's own warnings after the merge's.
fn part_view(merged: Option<&MergeOutcome>, own: Extraction) -> (RunLine, Vec<String>) {
    let (line, mut warnings) = match merged {
        Some(m) => (
            RunLine::from_extraction(&m.extraction),
            m.extraction.columns.warnings.clone(),
        ),
        None => (RunLine::from_extraction(&own), Vec::new()),
    };
    warnings.extend(own.columns.warnings);
    (line, warnings)
}

/// `s3://bucket/key` as a fetch source (the worker's own copies, read back for a merge).
fn s3_source(uri: &str) -> Option<Source> {
    let (bucket, key) = uri.strip_prefix("s3://")?.split_once('/')?;
    Some(Source::S3 {
        bucket: bucket.to_string(),
        key: key.to_string(),
    })
}

/// Hands the heap's free pages back to the kernel. A merge parses one large summary
/// after another; glibc keeps each freed tree's pages (in whichever of its per-thread
/// arenas the parse ran), so without this the resident set grows towards the sum of
/// several parts' peaks although only one part is alive at a time. That is for the
/// library under glibc's allocator (tests, benches); the worker's binary allocates with
/// mimalloc, which returns freed memory at once (`src/main.rs`), and there this only
/// trims what C code allocated from glibc.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it touches no
    // live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}
