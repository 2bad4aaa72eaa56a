//! `submit`: the runner side. Run after `k6 run` in a runner pod or CI job, it stages the
//! run's files in S3 and publishes the run-completed message with publisher confirms.
//!
//! Staging keys are deterministic (`<staging_prefix>/<org>/<project>/<run_id>/<file>`),
//! so a runner that retries `submit` overwrites its own files, and the worker's `run_id`
//! idempotence absorbs a second message.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use chrono::{DateTime, Utc};
use clap::Args;
use serde_json::Value;
use uuid::Uuid;

use crate::artifact::safe_file_name;
use crate::config::Settings;
use crate::message::{Artifacts, Part, RunCompleted, Trigger};
use crate::publish::{Outgoing, publish};
use crate::s3::{ArtifactStore, build_client, content_type_for};

/// Flags of `k6-ingest submit`; each also reads an environment variable, so a runner
/// image can be configured without changing its command line.
#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    #[arg(long, env = "K6_INGEST_RUN_ID")]
    pub run_id: Uuid,
    #[arg(long, env = "K6_INGEST_TEST_ID")]
    pub test_id: Uuid,
    #[arg(long, env = "K6_INGEST_ORGANIZATION_ID")]
    pub organization_id: Uuid,
    #[arg(long, env = "K6_INGEST_PROJECT_ID")]
    pub project_id: Uuid,
    #[arg(long, env = "K6_INGEST_JOB_ID")]
    pub job_id: Option<Uuid>,
    #[arg(long, env = "K6_INGEST_LOCATION")]
    pub location: Option<String>,
    /// manual, schedule, api, ci_cd or remote.
    #[arg(long, env = "K6_INGEST_TRIGGER", value_parser = parse_trigger)]
    pub trigger: Option<Trigger>,
    /// k6's exit code (`$?` right after `k6 run`).
    #[arg(long, env = "K6_INGEST_EXIT_CODE", allow_hyphen_values = true)]
    pub exit_code: i32,
    /// The handleSummary JSON or --summary-export file; skipped if k6 did not write it.
    #[arg(long, env = "K6_INGEST_SUMMARY", default_value = "summary.json")]
    pub summary: PathBuf,
    /// k6's console output (stderr), optional.
    #[arg(long, env = "K6_INGEST_LOGS")]
    pub logs: Option<PathBuf>,
    /// An HTML report, optional.
    #[arg(long, env = "K6_INGEST_REPORT")]
    pub report: Option<PathBuf>,
    /// Raw samples from `--out json=...` (.ndjson or .ndjson.gz), optional.
    #[arg(long, env = "K6_INGEST_METRICS")]
    pub metrics: Option<PathBuf>,
    /// When k6 started (RFC 3339); default: the end minus the summary's run duration.
    #[arg(long, env = "K6_INGEST_STARTED_AT")]
    pub started_at: Option<DateTime<Utc>>,
    /// When k6 finished (RFC 3339); default: now.
    #[arg(long, env = "K6_INGEST_COMPLETED_AT")]
    pub completed_at: Option<DateTime<Utc>>,
    #[arg(long, env = "K6_INGEST_K6_VERSION")]
    pub k6_version: Option<String>,
    /// A JSON object stored in `runs.metadata`.
    #[arg(long, env = "K6_INGEST_METADATA", value_parser = parse_object)]
    pub metadata: Option<Value>,
    /// A JSON object stored in `config_snapshot`.
    #[arg(long, env = "K6_INGEST_CONFIG_SNAPSHOT", value_parser = parse_object)]
    pub config_snapshot: Option<Value>,
    /// This runner's share of a split run, `INDEX/COUNT` (0-based index), SPEC section 12.
    #[arg(long, env = "K6_INGEST_PART", value_parser = parse_part, conflicts_with = "execution_segment")]
    pub part: Option<(u32, u32)>,
    /// k6's `--execution-segment` of this runner (`1/4:2/4`), as k6-operator passes it;
    /// index and count are derived from it (and from the sequence, when given).
    #[arg(long, env = "K6_INGEST_EXECUTION_SEGMENT")]
    pub execution_segment: Option<String>,
    /// k6's `--execution-segment-sequence` (`0,1/4,2/4,3/4,1`), for unequal segments.
    #[arg(
        long,
        env = "K6_INGEST_EXECUTION_SEGMENT_SEQUENCE",
        requires = "execution_segment"
    )]
    pub execution_segment_sequence: Option<String>,
    /// The runner's name (a pod name), stored with its part.
    #[arg(long, env = "K6_INGEST_RUNNER")]
    pub runner: Option<String>,
    /// Print the message that would be published; upload and publish nothing.
    #[arg(long)]
    pub dry_run: bool,
}

fn parse_trigger(s: &str) -> Result<Trigger, String> {
    serde_json::from_value(Value::String(s.to_string()))
        .map_err(|_| format!("{s:?} is not one of manual, schedule, api, ci_cd, remote"))
}

fn parse_part(s: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{s:?} is not INDEX/COUNT like 0/4");
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let part = Part {
        index: i.trim().parse().map_err(|_| bad())?,
        count: n.trim().parse().map_err(|_| bad())?,
        runner: None,
        execution_segment: None,
    };
    part.validate()?;
    Ok((part.index, part.count))
}

/// The message's `part`, from `--part` or `--execution-segment`.
fn part_of(args: &SubmitArgs) -> anyhow::Result<Option<Part>> {
    let mut part = match (&args.part, &args.execution_segment) {
        (Some((index, count)), _) => Part {
            index: *index,
            count: *count,
            runner: None,
            execution_segment: None,
        },
        (None, Some(segment)) => {
            Part::from_execution_segment(segment, args.execution_segment_sequence.as_deref())
                .map_err(|e| anyhow::anyhow!("--execution-segment: {e}"))?
        }
        (None, None) => return Ok(None),
    };
    part.runner = args.runner.clone();
    Ok(Some(part))
}

fn parse_object(s: &str) -> Result<Value, String> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("not valid JSON: {e}")),
    }
}

/// What `submit` did, for its one-line report.
#[derive(Debug)]
pub struct Submitted {
    pub message: RunCompleted,
    pub staged: Vec<String>,
    pub skipped: Vec<String>,
}

/// The files that exist, by role; a missing optional file is reported, not fatal: a run
/// that failed early (script error) has no summary, and the worker records why.
fn present(args: &SubmitArgs) -> (Vec<(&'static str, &Path)>, Vec<String>) {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    let roles: [(&'static str, Option<&Path>); 4] = [
        ("summary", Some(args.summary.as_path())),
        ("logs", args.logs.as_deref()),
        ("report_html", args.report.as_deref()),
        ("metrics", args.metrics.as_deref()),
    ];
    for (role, path) in roles {
        let Some(path) = path else { continue };
        if path.is_file() {
            found.push((role, path));
        } else {
            skipped.push(format!("{role} ({} not found)", path.display()));
        }
    }
    (found, skipped)
}

/// k6's own run duration from a summary file, to date the start when no flag says.
fn summary_duration_ms(path: &Path) -> Option<i64> {
    let bytes = std::fs::read(path).ok()?;
    let s = crate::summary::parse_summary(&bytes).ok()?;
    s.test_run_duration_ms.map(|d| d.round() as i64)
}

pub async fn submit(settings: &Settings, args: &SubmitArgs) -> anyhow::Result<Submitted> {
    let completed_at = args.completed_at.unwrap_or_else(Utc::now);
    let started_at = args.started_at.unwrap_or_else(|| {
        let ms = summary_duration_ms(&args.summary).unwrap_or(0);
        completed_at - chrono::Duration::milliseconds(ms)
    });
    let (files, skipped) = present(args);
    let part = part_of(args)?;

    let mut staging = settings.s3.clone();
    staging.prefix = settings.s3.staging_prefix.clone();
    let bucket = staging.bucket()?.to_string();
    let store = if args.dry_run {
        None
    } else {
        Some(ArtifactStore::new(
            build_client(&staging).await,
            &staging,
            &bucket,
        ))
    };

    let mut artifacts = Artifacts::default();
    let mut staged = Vec::new();
    for (role, path) in files {
        // The worker accepts only plain keys (no `%`, `..`, control characters), so the
        // file name is staged as the worker would store it anyway.
        let name = path
            .file_name()
            .map(|n| safe_file_name(&n.to_string_lossy()))
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| role.to_string());
        // The parts of a split run share the run's staging folder: each its own names.
        let name = match &part {
            Some(p) => format!("part-{}-{name}", p.index),
            None => name,
        };
        let key = ArtifactStore::key_with_prefix(
            &staging.prefix,
            args.organization_id,
            args.project_id,
            args.run_id,
            &name,
        );
        let uri = format!("s3://{bucket}/{key}");
        if let Some(store) = &store {
            store
                .upload_file(path, &key, content_type_for(&name))
                .await
                .with_context(|| format!("Failed to stage {} in S3", path.display()))?;
        }
        match role {
            "summary" => artifacts.summary = Some(uri.clone()),
            "logs" => artifacts.logs = Some(uri.clone()),
            "report_html" => artifacts.report_html = Some(uri.clone()),
            _ => artifacts.metrics = Some(uri.clone()),
        }
        staged.push(uri);
    }

    let message = RunCompleted {
        schema_version: 1,
        event_id: Uuid::now_v7(),
        run_id: args.run_id,
        job_id: args.job_id,
        test_id: args.test_id,
        organization_id: args.organization_id,
        project_id: args.project_id,
        location: args.location.clone(),
        trigger: args.trigger,
        started_at,
        completed_at: Some(completed_at),
        exit_code: Some(args.exit_code),
        k6_version: args.k6_version.clone(),
        artifacts,
        config_snapshot: args.config_snapshot.clone(),
        metadata: args.metadata.clone(),
        part,
        decode_warnings: Vec::new(),
    };
    if !args.dry_run {
        let body = serde_json::to_vec(&message)?;
        let out = Outgoing {
            label: match &message.part {
                Some(p) => format!("run {} part {}/{}", args.run_id, p.index, p.count),
                None => format!("run {}", args.run_id),
            },
            body: Ok(body),
            message_id: Some(message.event_id.to_string()),
        };
        let report = publish(&settings.amqp, vec![out]).await?;
        if let Some((_, reason)) = report.failed.first() {
            anyhow::bail!("the run-completed message was not confirmed: {reason}");
        }
    }
    Ok(Submitted {
        message,
        staged,
        skipped,
    })
}
