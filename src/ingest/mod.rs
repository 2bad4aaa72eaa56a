//! `ingest_one`: the step every driver (consumer, replay, tests) calls for one run.
//!
//! fetch summary → (fetch other artifacts, read raw samples if they fill a gap) →
//! extract (pure) → upload artifacts to S3 → one transaction. A run already stored is
//! recognised before any artifact is touched, so redelivery costs one query.

pub mod error;
mod parts;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::{Value, json};
use sqlx::PgPool;
use uuid::Uuid;

pub use error::{Disposition, IngestError};

use crate::artifact::{
    FetchError, Fetcher, LocalArtifact, Source, Tenant, open_lines_capped, redact_uri,
};
use crate::db::{Db, ErrorRecord, NewRun, StoreError, Stored};
use crate::message::{RunCompleted, replace_nul};
use crate::s3::{ArtifactStore, content_type_for};
use crate::summary::limits::{SummaryLimits, check_document, check_rows};
use crate::summary::parse::parse_summary_value;
use crate::summary::samples::{SampleSets, collect_samples_with};
use crate::summary::{
    Extraction, Summary, SummaryError, extract, extract_without_summary, wanted_samples,
};

/// How a driver wants one run handled.
#[derive(Debug, Clone, Default)]
pub struct IngestContext {
    /// The message file's directory (replay): relative artifact paths resolve here.
    pub base_dir: Option<PathBuf>,
    /// Fetch and extract, but upload and write nothing.
    pub dry_run: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Ingested,
    /// An earlier `error` record without a summary was replaced.
    Replaced,
    AlreadyPresent,
    DryRun,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingested => "ingested",
            Self::Replaced => "replaced",
            Self::AlreadyPresent => "already present",
            Self::DryRun => "dry run",
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
}

/// Everything `ingest_one` needs; cheap to clone (pools and clients are shared).
#[derive(Clone)]
pub struct Ingestor {
    db: Option<Db>,
    store: Option<ArtifactStore>,
    fetcher: Fetcher,
    inline_summary_max: u64,
    summary_limits: SummaryLimits,
    /// `ingest.part_wait_secs`: see [`Ingestor::sweep_incomplete_parts`].
    part_wait: std::time::Duration,
}

/// The summary after fetching and parsing, or why there is none.
enum SummaryLoad {
    Parsed {
        size: u64,
        /// The document for `summary_json`, kept only when it is inlined.
        doc: Option<Value>,
        /// Shared with the extraction task instead of copied.
        summary: std::sync::Arc<Summary>,
        file_name: String,
        /// The file for S3, kept only when it is not inlined.
        bytes: Vec<u8>,
    },
    Missing {
        reason: String,
    },
    Unreadable {
        reason: String,
        bytes: Vec<u8>,
        file_name: String,
    },
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

impl Ingestor {
    pub fn new(
        pool: Option<PgPool>,
        store: Option<ArtifactStore>,
        fetcher: Fetcher,
        inline_summary_max: u64,
    ) -> Self {
        Self {
            db: pool.map(|p| Db::new(p, true)),
            store,
            fetcher,
            inline_summary_max,
            summary_limits: SummaryLimits::default(),
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
        self.summary_limits = limits;
        self
    }

    pub fn pool(&self) -> Option<&PgPool> {
        self.db.as_ref().map(Db::pool)
    }

    /// `database.prepared_statements`: false behind a transaction pooler without
    /// prepared-statement support (see [`Db`]).
    pub fn with_prepared_statements(mut self, on: bool) -> Self {
        self.db = self.db.map(|d| Db::new(d.pool().clone(), on));
        self
    }

    /// The artifact store, for its outage probe.
    pub fn store(&self) -> Option<&ArtifactStore> {
        self.store.as_ref()
    }

    /// Ingests one run. `Ok` means the run is stored (now or before) or, in a dry run,
    /// that it could be; `Err` says what went wrong and, through `disposition`, what to do.
    #[tracing::instrument(name = "ingest", skip_all, fields(run.id = %msg.run_id, event.id = %msg.event_id,
        organization.id = %msg.organization_id, project.id = %msg.project_id))]
    pub async fn ingest_one(
        &self,
        msg: &RunCompleted,
        ctx: &IngestContext,
    ) -> Result<IngestReport, IngestError> {
        if let Some(part) = &msg.part {
            return self.ingest_part(msg, part, ctx).await;
        }
        let run_id = msg.run_id;
        let store_err = |source| IngestError::Store { run_id, source };
        let existing = match &self.db {
            Some(db) => Some(
                db.existing(run_id)
                    .await
                    .map_err(|e| store_err(StoreError::Db(e)))?,
            ),
            None => None,
        };
        if let Some(ex) = &existing {
            ex.check_tenant(msg).map_err(store_err)?;
            if ex.performance_has_summary == Some(true) {
                return self.already_present(run_id).await;
            }
        }

        let load = self.load_summary(msg, ctx).await?;
        let has_summary = matches!(load, SummaryLoad::Parsed { .. });
        if existing.as_ref().is_some_and(|ex| ex.is_final(has_summary)) {
            return self.already_present(run_id).await;
        }

        let mut warnings: Vec<String> = msg.decode_warnings.clone();
        let mut locals: Vec<(&'static str, String, Source, LocalArtifact)> = Vec::new();
        for (role, uri) in [
            ("logs", &msg.artifacts.logs),
            ("report_html", &msg.artifacts.report_html),
            ("metrics", &msg.artifacts.metrics),
        ] {
            let Some(uri) = uri.as_deref() else { continue };
            match self.fetch_local(uri, ctx, &Tenant::of(msg)).await {
                Ok((source, local)) => locals.push((role, redact_uri(uri), source, local)),
                Err(e) if e.is_transient() => {
                    return Err(IngestError::Fetch {
                        run_id,
                        artifact: role,
                        source: e,
                    });
                }
                Err(e) => warnings.push(format!("{role} artifact not stored: {e}")),
            }
        }

        let samples = match &load {
            SummaryLoad::Parsed { summary, .. } => {
                let metrics_file = locals
                    .iter()
                    .find(|l| l.0 == "metrics")
                    .map(|l| l.3.path.clone());
                self.read_samples(summary, metrics_file, &mut warnings)
                    .await
            }
            _ => None,
        };

        let (mut extraction, summary_reason) = match &load {
            SummaryLoad::Parsed { summary, .. } => {
                let summary = std::sync::Arc::clone(summary);
                let exit_code = msg.exit_code;
                let extraction = tokio::task::spawn_blocking(move || {
                    extract(&summary, exit_code, samples.as_ref())
                })
                .await
                .map_err(|e| IngestError::Config {
                    run_id,
                    message: format!("extraction task failed: {e}"),
                })?;
                (extraction, None)
            }
            SummaryLoad::Missing { reason } | SummaryLoad::Unreadable { reason, .. } => (
                extract_without_summary(msg.exit_code, reason),
                Some(reason.clone()),
            ),
        };
        extraction.columns.warnings.extend(warnings);

        // A summary k6 should have written but that is missing or unreadable: the run is
        // recorded as `error`, and the caller is told so the message is kept for a replay.
        let unusable = summary_reason
            .filter(|_| summary_expected(msg.exit_code))
            .map(|reason| IngestError::SummaryUnusable { run_id, reason });

        if ctx.dry_run {
            if let Some(e) = unusable {
                return Err(e);
            }
            let line = RunLine::from_extraction(&extraction);
            return Ok(IngestReport {
                run_id,
                outcome: Outcome::DryRun,
                line,
                bytes_uploaded: 0,
                warnings: extraction.columns.warnings,
            });
        }

        let Some(db) = &self.db else {
            return Err(IngestError::Config {
                run_id,
                message: "no database configured (database.url)".into(),
            });
        };

        // --- uploads: deterministic keys, so a retry overwrites ---
        let mut uploads = Uploads::default();
        let mut artifact_paths = BTreeMap::<String, Value>::new();
        let mut logs_s3_url = None;
        let mut summary_json = None;
        let mut summary_s3_url = None;
        let mut taken_names: Vec<String> = Vec::new();
        for (role, uri, source, local) in &locals {
            let name = unique_name(&source.file_name(), role, &mut taken_names);
            let uri_s3 = self
                .upload(db, msg, &name, Body::File(local), &mut uploads)
                .await?;
            if *role == "logs" {
                logs_s3_url = Some(uri_s3.clone());
            }
            artifact_paths.insert(
                (*role).to_string(),
                json!({"source": uri, "s3": uri_s3, "bytes": local.size}),
            );
        }
        match load {
            SummaryLoad::Parsed {
                size,
                doc,
                file_name,
                bytes,
                ..
            } => {
                let source_uri = msg.artifacts.summary.as_deref().map(redact_uri);
                if let Some(doc) = doc {
                    summary_json = Some(doc);
                    artifact_paths.insert(
                        "summary".into(),
                        json!({"source": source_uri, "inline": true, "bytes": size}),
                    );
                } else {
                    let name = unique_name(&file_name, "summary", &mut taken_names);
                    let s3_uri = self
                        .upload(db, msg, &name, Body::Bytes(bytes), &mut uploads)
                        .await?;
                    artifact_paths.insert(
                        "summary".into(),
                        json!({"source": source_uri, "s3": s3_uri, "bytes": size}),
                    );
                    summary_s3_url = Some(s3_uri);
                }
            }
            SummaryLoad::Unreadable {
                bytes, file_name, ..
            } => {
                // Keep the unreadable file where a person can look at it.
                let name = unique_name(&file_name, "summary", &mut taken_names);
                let s3_uri = self
                    .upload(db, msg, &name, Body::Bytes(bytes), &mut uploads)
                    .await?;
                artifact_paths.insert(
                    "summary".into(),
                    json!({"source": msg.artifacts.summary.as_deref().map(redact_uri), "s3": s3_uri, "unreadable": true}),
                );
            }
            SummaryLoad::Missing { .. } => {}
        }
        let bytes_uploaded = uploads.bytes;

        let duration_ms = extraction
            .columns
            .duration_ms
            .or_else(|| msg.wall_duration_ms());
        let new = NewRun {
            msg,
            extraction: &extraction,
            has_summary,
            duration_ms,
            artifact_paths: Value::Object(artifact_paths.into_iter().collect()),
            logs_s3_url,
            summary_json,
            summary_s3_url,
        };
        let stored = match db.store_run(&new).await {
            Ok(stored) => stored,
            Err(refusal @ StoreError::Refused { .. }) => {
                return Err(self.record_refusal(db, &new, &uploads, refusal).await);
            }
            Err(e) => {
                if refuses_every_attempt(&e) {
                    self.remove_unreferenced(db, run_id, &uploads).await;
                }
                return Err(store_err(e));
            }
        };
        let outcome = match stored {
            Stored::Inserted { .. } => Outcome::Ingested,
            Stored::Replaced { .. } => Outcome::Replaced,
            Stored::AlreadyPresent => {
                // The stored record refers to its own uploads (the same deterministic
                // keys, for the same message); anything else of this attempt goes.
                self.remove_unreferenced(db, run_id, &uploads).await;
                return self.already_present(run_id).await;
            }
        };
        tracing::debug!(
            outcome = outcome.as_str(),
            status = extraction.columns.status.as_str(),
            bytes_uploaded,
            "run stored"
        );
        if let Some(e) = unusable {
            return Err(e);
        }
        Ok(IngestReport {
            run_id,
            outcome,
            line: RunLine::from_extraction(&extraction),
            bytes_uploaded,
            warnings: extraction.columns.warnings.clone(),
        })
    }

    /// The database refused the run's content: record the run as `error` (in its own
    /// transaction, without the refused content, referring to the uploaded artifacts so
    /// a person can look at them) and say so, for the message to be dead-lettered. If
    /// even that record cannot be written, the uploads no row refers to are deleted and
    /// the refusal is returned as it is.
    async fn record_refusal(
        &self,
        db: &Db,
        new: &NewRun<'_>,
        uploads: &Uploads,
        refusal: StoreError,
    ) -> IngestError {
        let run_id = new.msg.run_id;
        let reason = refusal.to_string();
        tracing::warn!(error = %reason, "the database refused the run; recording it as error");
        let record = ErrorRecord {
            msg: new.msg,
            reason: &reason,
            artifact_paths: &new.artifact_paths,
            logs_s3_url: new.logs_s3_url.as_deref(),
        };
        match db.store_error(&record).await {
            Ok(Stored::Inserted { .. } | Stored::Replaced { .. }) => {
                IngestError::ContentRefused { run_id, reason }
            }
            Ok(Stored::AlreadyPresent) => {
                self.remove_unreferenced(db, run_id, uploads).await;
                IngestError::ContentRefused { run_id, reason }
            }
            Err(e) => {
                tracing::error!(error = %e, "the error record of a refused run was not stored either");
                if refuses_every_attempt(&e) {
                    self.remove_unreferenced(db, run_id, uploads).await;
                }
                match e {
                    // The tenant check of the error record wins over the refusal.
                    e @ StoreError::TenantMismatch { .. } => {
                        IngestError::Store { run_id, source: e }
                    }
                    _ => IngestError::Store {
                        run_id,
                        source: refusal,
                    },
                }
            }
        }
    }

    /// Deletes this attempt's uploads that no committed row of the run refers to. Best
    /// effort: when the rows cannot be read, or a delete fails, objects stay (and a
    /// warning says which), since deleting one a row refers to would lose data.
    async fn remove_unreferenced(&self, db: &Db, run_id: Uuid, uploads: &Uploads) {
        if uploads.uris.is_empty() {
            return;
        }
        let Some(store) = &self.store else { return };
        let referenced = match db.referenced_s3_uris(run_id).await {
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
            .filter_map(|u| store.key_of(u).map(str::to_string))
            .collect();
        for e in store.delete_objects(&keys).await {
            tracing::warn!(error = %e, "could not delete an upload no row refers to");
        }
        if !keys.is_empty() {
            tracing::info!(objects = keys.len(), "deleted uploads no row refers to");
        }
    }

    async fn already_present(&self, run_id: Uuid) -> Result<IngestReport, IngestError> {
        let line = match &self.db {
            Some(db) => db
                .stored_line(run_id)
                .await
                .map_err(|e| IngestError::Store {
                    run_id,
                    source: e.into(),
                })?,
            None => RunLine::default(),
        };
        Ok(IngestReport {
            run_id,
            outcome: Outcome::AlreadyPresent,
            line,
            bytes_uploaded: 0,
            warnings: Vec::new(),
        })
    }

    async fn fetch_local(
        &self,
        uri: &str,
        ctx: &IngestContext,
        tenant: &Tenant,
    ) -> Result<(Source, LocalArtifact), FetchError> {
        let source = self.fetcher.resolve(uri, ctx.base_dir.as_deref(), tenant)?;
        let local = self
            .fetcher
            .fetch_to_local(uri, &source, self.fetcher.settings().max_artifact_bytes)
            .await?;
        Ok((source, local))
    }

    async fn load_summary(
        &self,
        msg: &RunCompleted,
        ctx: &IngestContext,
    ) -> Result<SummaryLoad, IngestError> {
        let run_id = msg.run_id;
        let Some(uri) = msg.artifacts.summary.as_deref() else {
            return Ok(SummaryLoad::Missing {
                reason: "the message names no summary artifact".into(),
            });
        };
        let fetched = async {
            let source = self
                .fetcher
                .resolve(uri, ctx.base_dir.as_deref(), &Tenant::of(msg))?;
            let bytes = self.fetcher.fetch_summary(uri, &source).await?;
            Ok::<_, FetchError>((source, bytes))
        }
        .await;
        let (source, bytes) = match fetched {
            Ok(v) => v,
            Err(e) if e.is_transient() => {
                return Err(IngestError::Fetch {
                    run_id,
                    artifact: "summary",
                    source: e,
                });
            }
            Err(e) => {
                return Ok(SummaryLoad::Missing {
                    reason: format!("summary unavailable: {e}"),
                });
            }
        };
        let file_name = source.file_name();
        let size = bytes.len() as u64;
        let limits = self.summary_limits;
        let parsed = tokio::task::spawn_blocking(move || {
            // The tree is bounded before it is built, the rows before they are extracted.
            let result = check_document(&bytes, &limits)
                .and_then(|()| {
                    serde_json::from_slice::<Value>(&bytes)
                        .map_err(|e| SummaryError::Json(e.to_string()))
                })
                .map(|mut doc| {
                    let replaced = replace_nul(&mut doc);
                    (doc, replaced)
                })
                .and_then(|(doc, replaced)| {
                    let mut summary = parse_summary_value(&doc)?;
                    summary.warnings.extend(replaced.warnings("summary"));
                    check_rows(&summary, &limits)?;
                    Ok((doc, summary))
                });
            (result, bytes)
        })
        .await
        .map_err(|e| IngestError::Config {
            run_id,
            message: format!("summary parser task failed: {e}"),
        })?;
        match parsed {
            (Ok((doc, summary)), bytes) => {
                // Only one of the two is needed later: drop the other now, not after
                // the uploads and the transaction.
                let inline = size <= self.inline_summary_max;
                Ok(SummaryLoad::Parsed {
                    size,
                    doc: inline.then_some(doc),
                    summary: std::sync::Arc::new(summary),
                    file_name,
                    bytes: if inline { Vec::new() } else { bytes },
                })
            }
            (Err(e), bytes) => Ok(SummaryLoad::Unreadable {
                reason: format!("summary {}: {e}", redact_uri(uri)),
                bytes,
                file_name,
            }),
        }
    }

    async fn read_samples(
        &self,
        summary: &Summary,
        metrics_file: Option<PathBuf>,
        warnings: &mut Vec<String>,
    ) -> Option<SampleSets> {
        let settings = self.fetcher.settings();
        let limits = settings.sample_limits();
        let max_samples = limits.max_samples;
        let max_inflated = settings.max_samples_inflated_bytes;
        let requests = wanted_samples(summary);
        let path = metrics_file?;
        if requests.is_empty() {
            return None;
        }
        // Every cap is enforced by the readers while the file streams: inflated bytes by
        // `open_lines_capped` (an error: no samples are used), line length, sample count
        // and memory by `collect_samples_with`.
        let result = tokio::task::spawn_blocking(move || {
            let reader = open_lines_capped(&path, max_inflated)?;
            collect_samples_with(reader, &requests, &limits)
        })
        .await;
        match result {
            Ok(Ok(sets)) => {
                if sets.bad_lines > 0 {
                    warnings.push(format!(
                        "metrics samples: {} lines were not valid JSON or longer than fetch.max_line_bytes and were skipped",
                        sets.bad_lines
                    ));
                }
                if !sets.skipped.is_empty() {
                    warnings.push(format!(
                        "metrics samples: collected for the first {} keys only; percentiles not computed for {}",
                        crate::summary::samples::MAX_SAMPLE_KEYS,
                        sets.skipped.join(", ")
                    ));
                }
                if sets.truncated {
                    warnings.push(format!("metrics samples: stopped at {max_samples} samples; percentiles not computed"));
                }
                Some(sets)
            }
            Ok(Err(e)) => {
                warnings.push(format!(
                    "metrics samples not used, percentiles not computed: {e}"
                ));
                None
            }
            Err(e) => {
                warnings.push(format!("metrics samples reader failed: {e}"));
                None
            }
        }
    }

    fn store_for(&self, run_id: Uuid) -> Result<&ArtifactStore, IngestError> {
        self.store.as_ref().ok_or_else(|| IngestError::Config {
            run_id,
            message: "artifacts need S3, but s3.bucket is not set".into(),
        })
    }

    /// Uploads one artifact of the run under its deterministic key; returns its S3 URI.
    /// When it fails for good, this attempt's uploads, the failed one included, are
    /// removed unless a stored row refers to them.
    async fn upload(
        &self,
        db: &Db,
        msg: &RunCompleted,
        name: &str,
        body: Body<'_>,
        uploads: &mut Uploads,
    ) -> Result<String, IngestError> {
        let store = self.store_for(msg.run_id)?;
        let key = store.key_for(msg.organization_id, msg.project_id, msg.run_id, name);
        let content_type = content_type_for(name);
        let sent = match body {
            Body::File(local) => store.upload_file(&local.path, &key, content_type).await,
            Body::Bytes(bytes) => store.upload_bytes(bytes, &key, content_type).await,
        };
        match sent {
            Ok(n) => uploads.bytes += n,
            Err(source) => {
                // A permanent failure ends in the dead-letter queue: remove this attempt's
                // objects, the failed key too (some stores keep part of a failed upload).
                // A transient one deletes nothing: it is retried under the same keys, and
                // a concurrent duplicate may be about to commit rows referring to them.
                if !source.transient {
                    uploads.uris.push(store.uri(&key));
                    self.remove_unreferenced(db, msg.run_id, uploads).await;
                }
                return Err(IngestError::Upload {
                    run_id: msg.run_id,
                    source,
                });
            }
        }
        let uri = store.uri(&key);
        uploads.uris.push(uri.clone());
        Ok(uri)
    }
}

/// A store failure every attempt of the message meets (the content or the tenant is
/// refused), so no concurrent duplicate can be about to commit rows referring to the
/// same keys: only then are this attempt's uploads removed. After any other failure
/// (connection trouble, a misconfigured pooler...) they stay; a retry or a replay
/// uploads them again under the same keys and refers to them.
fn refuses_every_attempt(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::TenantMismatch { .. } | StoreError::Refused { .. }
    )
}

/// What this attempt put in S3: the objects' URIs and the bytes sent.
#[derive(Default)]
struct Uploads {
    uris: Vec<String>,
    bytes: u64,
}

/// What an upload sends: a local file, streamed, or a small document already in memory.
enum Body<'a> {
    File(&'a LocalArtifact),
    Bytes(Vec<u8>),
}

/// A file name unique among this run's artifacts (two roles may share a source name).
fn unique_name(name: &str, role: &str, taken: &mut Vec<String>) -> String {
    let base = if name.is_empty() {
        role.to_string()
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
