//! `replay`: ingest message files from directories (backfills, fixtures), with the same
//! `Ingestor::ingest` as the consumer. Idempotent and so resumable: a second run over the
//! same paths finds every run already present and changes nothing.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use futures_util::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use uuid::Uuid;

use crate::ingest::{DryRun, IngestContext, IngestReport, Ingestor, Outcome};
use crate::message::RunCompleted;

/// One line of the final table.
#[derive(Debug)]
pub struct ReplayRow {
    /// The message file, relative to the replayed path it was found under.
    pub label: String,
    pub run_id: Option<Uuid>,
    pub result: Result<IngestReport, String>,
}

impl ReplayRow {
    pub fn failed(&self) -> bool {
        self.result.is_err()
    }
}

/// Every `message.json` under the paths (a file path is taken as a message file).
pub fn find_messages(paths: &[PathBuf]) -> anyhow::Result<Vec<(PathBuf, PathBuf)>> {
    let mut out = Vec::new();
    for root in paths {
        let meta = std::fs::metadata(root)
            .with_context(|| format!("Failed to read {}", root.display()))?;
        if meta.is_file() {
            let parent = root
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            out.push((root.clone(), parent));
            continue;
        }
        let mut stack = vec![root.clone()];
        let mut found = Vec::new();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir)
                .with_context(|| format!("Failed to list {}", dir.display()))?
            {
                let entry = entry?;
                let path = entry.path();
                let ft = entry.file_type()?;
                if ft.is_dir() {
                    stack.push(path);
                } else if ft.is_file() && entry.file_name() == "message.json" {
                    found.push(path);
                }
            }
        }
        found.sort();
        out.extend(found.into_iter().map(|f| (f, root.clone())));
    }
    Ok(out)
}

/// What replays the message files: the ingestor, or the dry run alone (which needs no
/// database and no bucket).
#[derive(Clone, Copy)]
pub enum Replayer<'a> {
    Ingest(&'a Ingestor),
    DryRun(&'a DryRun),
}

impl<'a> From<&'a Ingestor> for Replayer<'a> {
    fn from(i: &'a Ingestor) -> Self {
        Self::Ingest(i)
    }
}

impl<'a> From<&'a DryRun> for Replayer<'a> {
    fn from(d: &'a DryRun) -> Self {
        Self::DryRun(d)
    }
}

impl Replayer<'_> {
    /// A run stored as error is a failed row: its message needs a replay after a fix.
    async fn run(self, msg: &RunCompleted, ctx: &IngestContext) -> Result<IngestReport, String> {
        let result = match self {
            Self::Ingest(i) => i.ingest(msg, ctx).await.and_then(IngestReport::into_result),
            Self::DryRun(d) => d.run(msg, ctx).await,
        };
        result.map_err(|e| {
            let kind = match e.disposition() {
                crate::ingest::Disposition::Retry => " (transient: replay again later)",
                crate::ingest::Disposition::DeadLetter => "",
            };
            format!("{e}{kind}")
        })
    }
}

/// Replays the message files under `paths` with up to `concurrency` runs at once;
/// `dry_run` (or a [`DryRun`] replayer) fetches and extracts but writes nothing.
pub async fn replay<'a>(
    with: impl Into<Replayer<'a>>,
    paths: &[PathBuf],
    dry_run: bool,
    concurrency: usize,
    max_message_bytes: u64,
) -> anyhow::Result<Vec<ReplayRow>> {
    let with = match with.into() {
        Replayer::Ingest(i) if dry_run => Replayer::DryRun(i.dry()),
        other => other,
    };
    let files = find_messages(paths)?;
    let bar = ProgressBar::with_draw_target(Some(files.len() as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut rows: Vec<ReplayRow> = futures_util::stream::iter(files)
        .map(|(file, root)| {
            let bar = bar.clone();
            async move {
                let row = replay_file(with, &file, &root, max_message_bytes).await;
                bar.inc(1);
                bar.set_message(row.label.clone());
                row
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    bar.finish_and_clear();
    rows.sort_by(|a, b| a.label.cmp(&b.label));
    Ok(rows)
}

async fn replay_file(
    with: Replayer<'_>,
    file: &Path,
    root: &Path,
    max_message_bytes: u64,
) -> ReplayRow {
    let rel = file.strip_prefix(root).unwrap_or(file);
    let label = rel
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(rel)
        .display()
        .to_string();
    let label = if label.is_empty() {
        file.display().to_string()
    } else {
        label
    };
    let body = match read_limited(file, max_message_bytes) {
        Ok(b) => b,
        Err(e) => {
            return ReplayRow {
                label,
                run_id: None,
                result: Err(e),
            };
        }
    };
    let msg = match RunCompleted::decode(&body) {
        Ok(m) => m,
        Err(e) => {
            return ReplayRow {
                label,
                run_id: None,
                result: Err(e.to_string()),
            };
        }
    };
    let ctx = IngestContext {
        base_dir: file.parent().map(Path::to_path_buf),
    };
    let result = with.run(&msg, &ctx).await;
    ReplayRow {
        label,
        run_id: Some(msg.run_id),
        result,
    }
}

fn read_limited(file: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let meta =
        std::fs::metadata(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    if meta.len() > limit {
        return Err(format!(
            "message file is {} bytes, over the limit of {limit} (amqp.max_message_bytes)",
            meta.len()
        ));
    }
    std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_string(), |v| v.to_string())
}

/// The final table: one line per run, then a count per outcome.
pub fn render_table(rows: &[ReplayRow]) -> String {
    let mut table: Vec<[String; 8]> = vec![[
        "RESULT".into(),
        "RUN".into(),
        "STATUS".into(),
        "P95 MS".into(),
        "REQ/S".into(),
        "THRESHOLDS".into(),
        "CHECKS".into(),
        "NOTE".into(),
    ]];
    for row in rows {
        match &row.result {
            Ok(r) => {
                let l = &r.line;
                let thresholds = match (l.thresholds_total, l.thresholds_failed) {
                    (Some(0), _) => "none".to_string(),
                    (Some(t), Some(f)) => format!("{}/{t} ok", t - f),
                    _ => "-".to_string(),
                };
                let checks = match (l.checks_passed, l.checks_total) {
                    (Some(p), Some(t)) => format!("{p}/{t}"),
                    _ => "-".to_string(),
                };
                let rate = l
                    .request_rate
                    .map(|r| format!("{}.{:02}", r / 100, (r % 100).abs()));
                let note = if r.warnings.is_empty() {
                    String::new()
                } else {
                    format!("{} warning(s)", r.warnings.len())
                };
                table.push([
                    r.outcome.as_str().into(),
                    row.label.clone(),
                    opt(l.status.clone()),
                    opt(l.p95_ms),
                    opt(rate),
                    thresholds,
                    checks,
                    note,
                ]);
            }
            Err(reason) => table.push([
                "FAILED".into(),
                row.label.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                reason.clone(),
            ]),
        }
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| {
            table
                .iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in &table {
        for (c, w) in widths.iter().enumerate() {
            let _ = write!(out, "{:<w$}  ", r[c], w = *w);
        }
        out.push_str(r[7].trim_end());
        out.push('\n');
    }
    let count = |o: Outcome| {
        rows.iter()
            .filter(|r| matches!(&r.result, Ok(x) if x.outcome == o))
            .count()
    };
    let failed = rows.iter().filter(|r| r.failed()).count();
    let _ = writeln!(
        out,
        "\n{} runs: {} ingested, {} replaced, {} already present, {} dry run, {} failed",
        rows.len(),
        count(Outcome::Ingested),
        count(Outcome::Replaced),
        count(Outcome::AlreadyPresent),
        count(Outcome::DryRun),
        failed
    );
    out
}
