//! The steps before anything is written, shared by whole runs, split-run parts and the
//! dry run: fetch the summary and the other artifacts, then extract.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::{IngestContext, IngestError, IngestReport, Outcome, RunLine, summary_expected};
use crate::artifact::{
    FetchError, Fetcher, InflatedTooLarge, LocalArtifact, Source, Tenant, lines_capped,
    open_lines_capped, read_small, redact_uri,
};
use crate::message::{RunCompleted, replace_nul};
use crate::s3::IN_MEMORY_MAX;
use crate::summary::limits::{SummaryLimits, check_rows, parse_document};
use crate::summary::parse::{parse_summary_owned, parse_summary_value};
use crate::summary::samples::{SampleLimits, SampleRequest, SampleSets, collect_samples_with};
use crate::summary::{
    Extraction, Summary, SummaryError, extract, extract_without_summary, wanted_samples,
};

/// What an artifact of a run is; its `as_str` is the key in `runs.artifact_paths`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactRole {
    Summary,
    Logs,
    ReportHtml,
    Metrics,
}

impl ArtifactRole {
    /// The artifacts besides the summary, in the order they are fetched and named.
    const FILES: [Self; 3] = [Self::Logs, Self::ReportHtml, Self::Metrics];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Summary => "summary",
            Self::Logs => "logs",
            Self::ReportHtml => "report_html",
            Self::Metrics => "metrics",
        }
    }

    fn uri(self, msg: &RunCompleted) -> Option<&str> {
        let a = &msg.artifacts;
        match self {
            Self::Summary => a.summary.as_deref(),
            Self::Logs => a.logs.as_deref(),
            Self::ReportHtml => a.report_html.as_deref(),
            Self::Metrics => a.metrics.as_deref(),
        }
    }
}

impl std::fmt::Display for ArtifactRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The summary after fetching and parsing, or why there is none.
pub(super) enum SummaryLoad {
    Parsed {
        size: u64,
        /// The document for `summary_json`, kept only when it is inlined.
        doc: Option<Value>,
        /// Shared with the extraction task instead of copied.
        summary: Arc<Summary>,
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

/// An artifact other than the summary, in a local file.
pub(super) struct FetchedArtifact {
    pub role: ArtifactRole,
    /// The URI the message gave, redacted.
    pub source_uri: String,
    pub file_name: String,
    pub local: LocalArtifact,
    /// The file's bytes when it is small: read once, for its samples and its upload.
    pub bytes: Option<Vec<u8>>,
}

/// Everything fetched for a run. Artifacts that cannot be fetched for good are left out
/// with a warning; a fault that may pass fails the fetch instead.
pub(super) struct Fetched {
    pub summary: SummaryLoad,
    pub artifacts: Vec<FetchedArtifact>,
    pub warnings: Vec<String>,
    /// Raw samples, read only when the summary lacks a value they give and the run
    /// sent them; taken by the extraction.
    pub samples: Option<SampleSets>,
}

impl Fetched {
    pub fn has_summary(&self) -> bool {
        matches!(self.summary, SummaryLoad::Parsed { .. })
    }

    pub fn metrics_file(&self) -> Option<&Path> {
        self.artifacts
            .iter()
            .find(|a| a.role == ArtifactRole::Metrics)
            .map(|a| a.local.path.as_path())
    }
}

/// The extraction, and why the summary could not be used when it could not.
pub(super) struct Extracted {
    pub extraction: Extraction,
    pub summary_reason: Option<String>,
}

impl Extracted {
    /// A summary k6 should have written is missing or unreadable: the run is recorded as
    /// `error` and the message is kept for a replay once the summary is fixed.
    pub fn unusable(&self, msg: &RunCompleted) -> Option<String> {
        self.summary_reason
            .clone()
            .filter(|_| summary_expected(msg.exit_code))
    }
}

/// Summaries up to this size are parsed, and summaries of up to
/// [`EXTRACT_IN_PLACE_METRICS`] metrics extracted, on the async thread: a hop to the
/// blocking pool and back costs more CPU than the work itself at these sizes.
const PARSE_IN_PLACE_MAX: usize = 64 * 1024;
const EXTRACT_IN_PLACE_METRICS: usize = 200;

/// A parse's outcome (the document when it is inlined, and the summary) with the bytes
/// it was parsed from, which an S3 copy still needs.
type Parsed = (Result<(Option<Value>, Summary), SummaryError>, Vec<u8>);

/// The tree within its caps ([`parse_document`]), NUL replacement, the summary and
/// [`check_rows`].
fn parse_bounded(bytes: Vec<u8>, limits: &SummaryLimits, inline: bool) -> Parsed {
    let result = parse_document(&bytes, limits).and_then(|mut doc| {
        let replaced = replace_nul(&mut doc);
        let (doc, mut summary) = if inline {
            let summary = parse_summary_value(&doc)?;
            (Some(doc), summary)
        } else {
            (None, parse_summary_owned(doc)?)
        };
        summary.warnings.extend(replaced.warnings("summary"));
        check_rows(&summary, limits)?;
        Ok((doc, summary))
    });
    (result, bytes)
}

/// Fetch and extract, and nothing else: the steps every run goes through before a
/// write, and on their own the dry run, which needs no database and no bucket.
#[derive(Clone)]
pub struct DryRun {
    fetcher: Fetcher,
    inline_summary_max: u64,
    summary_limits: SummaryLimits,
}

impl DryRun {
    pub fn new(fetcher: Fetcher, inline_summary_max: u64) -> Self {
        Self {
            fetcher,
            inline_summary_max,
            summary_limits: SummaryLimits::default(),
        }
    }

    /// Caps on a summary's tree and detail rows (`Settings::summary_limits`).
    pub fn with_summary_limits(mut self, limits: SummaryLimits) -> Self {
        self.summary_limits = limits;
        self
    }

    pub(super) fn fetcher(&self) -> &Fetcher {
        &self.fetcher
    }

    /// `s3.inline_summary_max_bytes`: a larger summary goes to S3, not into the row.
    pub(super) fn inline_summary_max(&self) -> u64 {
        self.inline_summary_max
    }

    pub(super) fn summary_limits(&self) -> &SummaryLimits {
        &self.summary_limits
    }

    /// Fetches and extracts one run (or part) and reports what would be stored. A
    /// summary that would leave the run recorded as `error` fails the dry run.
    pub async fn run(
        &self,
        msg: &RunCompleted,
        ctx: &IngestContext,
    ) -> Result<IngestReport, IngestError> {
        let mut fetched = self.fetch(msg, ctx).await?;
        let extracted = self.extract(msg, &mut fetched).await?;
        if let Some(reason) = extracted.unusable(msg) {
            return Err(IngestError::SummaryUnusable {
                run_id: msg.run_id,
                reason,
            });
        }
        Ok(IngestReport {
            run_id: msg.run_id,
            outcome: Outcome::DryRun,
            line: RunLine::from_extraction(&extracted.extraction),
            bytes_uploaded: 0,
            warnings: extracted.extraction.columns.warnings,
            reason: None,
        })
    }

    /// The summary, then the other artifacts into local files.
    pub(super) async fn fetch(
        &self,
        msg: &RunCompleted,
        ctx: &IngestContext,
    ) -> Result<Fetched, IngestError> {
        let summary = self.load_summary(msg, ctx).await?;
        let mut warnings = msg.decode_warnings.clone();
        let tenant = Tenant::of(msg);
        let mut artifacts = Vec::new();
        for role in ArtifactRole::FILES {
            let Some(uri) = role.uri(msg) else { continue };
            match self.fetch_local(uri, ctx, &tenant).await {
                Ok((source, local)) => artifacts.push(FetchedArtifact {
                    role,
                    source_uri: redact_uri(uri),
                    file_name: source.file_name(),
                    local,
                    bytes: None,
                }),
                Err(e) if e.fault().is_retryable() => {
                    return Err(IngestError::Fetch {
                        run_id: msg.run_id,
                        artifact: role,
                        source: e,
                    });
                }
                Err(e) => warnings.push(format!("{role} artifact not stored: {e}")),
            }
        }
        let samples = self
            .read_files(&summary, &mut artifacts, &mut warnings)
            .await;
        Ok(Fetched {
            summary,
            artifacts,
            warnings,
            samples,
        })
    }

    /// The extraction: pure, from the summary and the samples the fetch read; a large
    /// summary's off the async threads.
    pub(super) async fn extract(
        &self,
        msg: &RunCompleted,
        fetched: &mut Fetched,
    ) -> Result<Extracted, IngestError> {
        let warnings = fetched.warnings.clone();
        let samples = fetched.samples.take();
        let (mut extraction, summary_reason) = match &fetched.summary {
            SummaryLoad::Parsed { summary, .. } => {
                let exit_code = msg.exit_code;
                if summary.metrics.len() <= EXTRACT_IN_PLACE_METRICS {
                    (extract(summary, exit_code, samples.as_ref()), None)
                } else {
                    let summary = Arc::clone(summary);
                    let extraction = tokio::task::spawn_blocking(move || {
                        extract(&summary, exit_code, samples.as_ref())
                    })
                    .await
                    .map_err(|e| IngestError::Config {
                        run_id: msg.run_id,
                        message: format!("extraction task failed: {e}"),
                    })?;
                    (extraction, None)
                }
            }
            SummaryLoad::Missing { reason } | SummaryLoad::Unreadable { reason, .. } => (
                extract_without_summary(msg.exit_code, reason),
                Some(reason.clone()),
            ),
        };
        extraction.columns.warnings.extend(warnings);
        Ok(Extracted {
            extraction,
            summary_reason,
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
            Err(e) if e.fault().is_retryable() => {
                return Err(IngestError::Fetch {
                    run_id: msg.run_id,
                    artifact: ArtifactRole::Summary,
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
        let (parsed, bytes) = self
            .parse_summary(bytes)
            .await
            .map_err(|e| IngestError::Config {
                run_id: msg.run_id,
                message: format!("summary parser task failed: {e}"),
            })?;
        Ok(self.loaded(parsed, bytes, file_name, uri))
    }

    /// A parsed summary keeps only what is needed later: its document when it is
    /// inlined, else its bytes for S3 (the other is dropped now, not after the uploads
    /// and the transaction). An unreadable one keeps its bytes for a person to look at.
    fn loaded(
        &self,
        parsed: Result<(Option<Value>, Summary), SummaryError>,
        bytes: Vec<u8>,
        file_name: String,
        uri: &str,
    ) -> SummaryLoad {
        match parsed {
            Ok((doc, summary)) => {
                let size = bytes.len() as u64;
                let inline = doc.is_some();
                SummaryLoad::Parsed {
                    size,
                    doc,
                    summary: Arc::new(summary),
                    file_name,
                    bytes: if inline { Vec::new() } else { bytes },
                }
            }
            Err(e) => SummaryLoad::Unreadable {
                reason: format!("summary {}: {e}", redact_uri(uri)),
                bytes,
                file_name,
            },
        }
    }

    /// The document and the summary, bounded before the tree is built and before the
    /// rows are extracted; the bytes come back for an S3 copy. A summary of a typical
    /// size is parsed where it is (a fraction of a millisecond); a larger one on the
    /// blocking pool, so it never holds up the other runs' tasks.
    async fn parse_summary(&self, bytes: Vec<u8>) -> Result<Parsed, tokio::task::JoinError> {
        let limits = self.summary_limits;
        // The tree is kept only when it is inlined; otherwise each metric's part of it is
        // freed as soon as it is converted, so tree and summary are never both whole.
        let inline = bytes.len() as u64 <= self.inline_summary_max;
        if bytes.len() <= PARSE_IN_PLACE_MAX {
            return Ok(parse_bounded(bytes, &limits, inline));
        }
        tokio::task::spawn_blocking(move || parse_bounded(bytes, &limits, inline)).await
    }

    /// The run's small files read whole (the upload sends them from memory), and the
    /// raw samples collected when the summary lacks a value they give, from those bytes
    /// when the metrics file is one of them. Every cap is enforced by the readers while
    /// the file streams: inflated bytes by the capped line reader (an error: no samples
    /// are used), line length, sample count and memory by `collect_samples_with`.
    async fn read_files(
        &self,
        summary: &SummaryLoad,
        artifacts: &mut [FetchedArtifact],
        warnings: &mut Vec<String>,
    ) -> Option<SampleSets> {
        let requests = match summary {
            SummaryLoad::Parsed { summary, .. } => wanted_samples(summary),
            _ => Vec::new(),
        };
        read_small_files(artifacts).await;
        let metrics = artifacts
            .iter()
            .find(|a| a.role == ArtifactRole::Metrics)
            .filter(|_| !requests.is_empty())?;
        let settings = self.fetcher.settings();
        let limits = settings.sample_limits();
        let max_inflated = settings.max_samples_inflated_bytes;
        match collect_samples(metrics, requests, limits, max_inflated).await {
            Ok(Ok(sets)) => {
                warnings.extend(sample_warnings(&sets, limits.max_samples));
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
}

/// A run's small files together up to this size are read where the run is: a few
/// page-cache reads cost less CPU than a hop to the blocking pool and back.
const READ_IN_PLACE_MAX: u64 = 64 * 1024;

/// Raw samples are collected where the run is from a metrics file in memory while it
/// inflates to at most this (a typical run's few hundred lines: a fraction of a
/// millisecond); past it, the collection starts again on the blocking pool.
const SAMPLES_IN_PLACE_MAX: u64 = 256 * 1024;

/// Reads each artifact of at most [`IN_MEMORY_MAX`] into its `bytes`; one that cannot
/// be read keeps none, and is read again (and the failure reported) by its upload.
async fn read_small_files(artifacts: &mut [FetchedArtifact]) {
    let small: Vec<(usize, PathBuf)> = artifacts
        .iter()
        .enumerate()
        .filter(|(_, a)| a.local.size <= IN_MEMORY_MAX)
        .map(|(i, a)| (i, a.local.path.clone()))
        .collect();
    let total: u64 = small.iter().map(|(i, _)| artifacts[*i].local.size).sum();
    let read_all = move || {
        small
            .into_iter()
            .map(|(i, path)| (i, read_small(&path, IN_MEMORY_MAX)))
            .collect::<Vec<_>>()
    };
    let read = if total <= READ_IN_PLACE_MAX {
        read_all()
    } else {
        tokio::task::spawn_blocking(read_all)
            .await
            .unwrap_or_default()
    };
    for (i, bytes) in read {
        artifacts[i].bytes = bytes;
    }
}

/// The metrics file's samples: in place from its bytes when they inflate to at most
/// [`SAMPLES_IN_PLACE_MAX`], else on the blocking pool.
async fn collect_samples(
    metrics: &FetchedArtifact,
    requests: Vec<SampleRequest>,
    limits: SampleLimits,
    max_inflated: u64,
) -> Result<std::io::Result<SampleSets>, tokio::task::JoinError> {
    if let Some(bytes) = &metrics.bytes {
        let cap = max_inflated.min(SAMPLES_IN_PLACE_MAX);
        match collect_from(Some(bytes), &metrics.local.path, &requests, &limits, cap) {
            Err(e) if cap < max_inflated && is_over_cap(&e) => {}
            done => return Ok(done),
        }
    }
    let (path, bytes) = (metrics.local.path.clone(), metrics.bytes.clone());
    tokio::task::spawn_blocking(move || {
        collect_from(bytes.as_deref(), &path, &requests, &limits, max_inflated)
    })
    .await
}

fn is_over_cap(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.is::<InflatedTooLarge>())
}

/// The raw samples, from the metrics file's bytes when the fetch read them, else from
/// the file.
fn collect_from(
    bytes: Option<&[u8]>,
    path: &Path,
    requests: &[SampleRequest],
    limits: &SampleLimits,
    max_inflated: u64,
) -> std::io::Result<SampleSets> {
    match bytes {
        Some(bytes) => collect_samples_with(lines_capped(bytes, max_inflated), requests, limits),
        None => open_lines_capped(path, max_inflated)
            .and_then(|reader| collect_samples_with(reader, requests, limits)),
    }
}

fn sample_warnings(sets: &SampleSets, max_samples: usize) -> Vec<String> {
    let mut out = Vec::new();
    if sets.bad_lines > 0 {
        out.push(format!(
            "metrics samples: {} lines were not valid JSON or longer than fetch.max_line_bytes and were skipped",
            sets.bad_lines
        ));
    }
    if !sets.skipped.is_empty() {
        out.push(format!(
            "metrics samples: collected for the first {} keys only; percentiles not computed for {}",
            crate::summary::samples::MAX_SAMPLE_KEYS,
            sets.skipped.join(", ")
        ));
    }
    if sets.truncated {
        out.push(format!(
            "metrics samples: stopped at {max_samples} samples; percentiles not computed"
        ));
    }
    out
}
