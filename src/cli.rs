//! The command line: one binary, one subcommand per driver.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::app::{build_dry_run, build_ingestor};
use crate::config::Settings;
use crate::summary::samples::collect_samples_with;
use crate::summary::{extract, parse_summary, wanted_samples};

#[derive(Debug, Parser)]
#[command(
    name = "k6-ingest",
    version,
    about = "Turns finished k6 load tests into rows in PostgreSQL"
)]
pub struct Cli {
    /// A TOML settings file; K6_INGEST__SECTION__KEY variables override it.
    #[arg(long, global = true, env = "K6_INGEST_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the embedded database migrations.
    Migrate,
    /// Print the k6_performance_runs columns extracted from one summary file, as JSON.
    Extract {
        /// summary.json (handleSummary data), a --summary-export file, or a
        /// machine-readable summary; gzip is accepted.
        file: PathBuf,
        /// k6's exit code, which decides the status together with the thresholds.
        #[arg(long, allow_hyphen_values = true)]
        exit_code: Option<i32>,
        /// Raw samples (`--out json`, .ndjson or .ndjson.gz) to fill missing percentiles.
        #[arg(long)]
        metrics: Option<PathBuf>,
        /// Print the detail rows (metrics, thresholds, checks) too.
        #[arg(long)]
        details: bool,
    },
    /// Consume run-completed messages from RabbitMQ and ingest them (the worker).
    Consume,
    /// Publish message.json files (or directories of them, or NDJSON files with one
    /// message a line) to RabbitMQ with publisher confirms.
    Publish {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Move messages from the dead-letter queue back to the work queue, attempts reset.
    Requeue {
        /// Move at most this many (default: all present when the command starts).
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Runner side, after `k6 run`: stage the run's files in S3 and publish its
    /// run-completed message with publisher confirms.
    Submit(Box<crate::submit::SubmitArgs>),
    /// Create the k6 tables' partitions of this month and the next N months (UTC), ahead
    /// of need. Idempotent; run it daily (deploy/k8s/base/partitions-cronjob.yaml).
    Partitions {
        #[arg(long, default_value_t = 3)]
        ahead: u32,
    },
    /// Archive every whole month before DATE to S3 (`<s3.prefix>/archive/<YYYY-MM>/`),
    /// verify it by reading it back, then drop its partitions. Safe to interrupt and rerun.
    Archive {
        /// YYYY-MM-DD (UTC): months that end on or before this day are archived.
        #[arg(long, conflicts_with = "hot_months")]
        before: Option<String>,
        /// Keep this many whole months before the current one (UTC) in the database and
        /// archive older ones: 3 keeps about 90 days. Without this or `--before`, the
        /// setting `retention.hot_months` decides (a CronJob's date moves; the setting
        /// lives with the others in the ConfigMap).
        #[arg(long)]
        hot_months: Option<u32>,
    },
    /// Load an archived month (YYYY-MM) back into the database, row for row.
    Restore { month: String },
    /// Ingest message.json files (or directories holding them) without a broker.
    Replay {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Fetch and extract, but upload and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Runs ingested at once (default: ingest.concurrency).
        #[arg(long)]
        concurrency: Option<usize>,
    },
}

/// Runs a command; the returned code is the process exit code.
pub async fn run(cli: Cli, settings: Settings) -> anyhow::Result<i32> {
    match cli.command {
        Command::Migrate => {
            let applied = crate::db::migrate(&settings.database).await?;
            println!(
                "migrations applied: {}",
                if applied.is_empty() {
                    "none (up to date)".to_string()
                } else {
                    format!("{applied:?}")
                }
            );
            Ok(0)
        }
        Command::Partitions { ahead } => {
            let pool = crate::db::connect(&settings.database).await?;
            let created = crate::history::ensure_ahead(&pool, ahead).await?;
            println!(
                "partitions: {} month(s) created{}",
                created.len(),
                if created.is_empty() {
                    String::new()
                } else {
                    format!(
                        " ({})",
                        created
                            .iter()
                            .map(|m| m.format("%Y-%m").to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                }
            );
            Ok(0)
        }
        Command::Archive { before, hot_months } => {
            let before = match (before, hot_months) {
                (Some(date), _) => crate::history::parse_date(&date)?,
                (None, hot) => crate::history::hot_months_start(
                    chrono::Utc::now(),
                    hot.unwrap_or(settings.retention.hot_months),
                )?,
            };
            let (pool, store) = history_services(&settings).await?;
            let done =
                crate::history::archive_before(&pool, &store, &settings.s3.prefix, before).await?;
            for (month, outcome) in &done {
                let month = month.format("%Y-%m");
                match outcome {
                    crate::history::MonthOutcome::Archived {
                        manifest_key,
                        rows,
                        bytes,
                    } => println!(
                        "{month}: archived {rows} rows, {bytes} bytes, {}",
                        store.uri(manifest_key)
                    ),
                    crate::history::MonthOutcome::AlreadyArchived => {
                        println!("{month}: already archived")
                    }
                }
            }
            println!("{} month(s) before {before}", done.len());
            Ok(0)
        }
        Command::Restore { month } => {
            let month = crate::history::parse_month(&month)?;
            let (pool, store) = history_services(&settings).await?;
            let restored = crate::history::restore_month(&pool, &store, month).await?;
            for (table, n) in &restored.rows {
                println!("{}: {table}: {n} rows restored", month.format("%Y-%m"));
            }
            Ok(0)
        }
        Command::Consume => {
            let shutdown = crate::app::shutdown_on_signals();
            crate::consumer::consume(&settings, shutdown).await?;
            Ok(0)
        }
        Command::Publish { paths } => {
            let messages = crate::publish::read_messages(&paths, settings.amqp.max_message_bytes)?;
            let report = crate::publish::publish(&settings.amqp, messages).await?;
            for (label, reason) in &report.failed {
                eprintln!("FAILED {label}: {reason}");
            }
            println!(
                "{} messages: {} confirmed, {} failed",
                report.total(),
                report.confirmed,
                report.failed.len()
            );
            Ok(if report.failed.is_empty() { 0 } else { 1 })
        }
        Command::Submit(args) => {
            let done = crate::submit::submit(&settings, &args).await?;
            for skipped in &done.skipped {
                eprintln!("k6-ingest: not staged: {skipped}");
            }
            if args.dry_run {
                println!("{}", serde_json::to_string_pretty(&done.message)?);
            } else {
                println!(
                    "run {} submitted: {} artifact(s) staged, message {} confirmed",
                    done.message.run_id,
                    done.staged.len(),
                    done.message.event_id
                );
            }
            Ok(0)
        }
        Command::Requeue { limit } => {
            let report = crate::publish::requeue(&settings.amqp, limit).await?;
            println!(
                "dead-letter queue held {}; requeued {}",
                report.found, report.requeued
            );
            Ok(0)
        }
        Command::Extract {
            file,
            exit_code,
            metrics,
            details,
        } => run_extract(&settings, &file, exit_code, metrics.as_deref(), details),
        Command::Replay {
            paths,
            dry_run,
            concurrency,
        } => {
            let roots = paths
                .iter()
                .map(|p| {
                    let dir = if p.is_file() {
                        p.parent().map(PathBuf::from).unwrap_or_default()
                    } else {
                        p.clone()
                    };
                    std::fs::canonicalize(&dir)
                        .with_context(|| format!("Failed to open {}", p.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let concurrency = concurrency.unwrap_or(settings.ingest.concurrency);
            let max_message_bytes = settings.amqp.max_message_bytes;
            if dry_run {
                let dry = build_dry_run(&settings, roots).await?;
                let rows =
                    crate::replay::replay(&dry, &paths, true, concurrency, max_message_bytes)
                        .await?;
                print!("{}", crate::replay::render_table(&rows));
                return Ok(i32::from(rows.iter().any(crate::replay::ReplayRow::failed)));
            }
            let ingestor = build_ingestor(&settings, roots).await?;
            let rows =
                crate::replay::replay(&ingestor, &paths, false, concurrency, max_message_bytes)
                    .await?;
            print!("{}", crate::replay::render_table(&rows));
            // Split runs whose parts are still missing after ingest.part_wait_secs.
            for run in ingestor
                .sweep_incomplete_parts(ingestor.part_wait())
                .await?
            {
                println!("run {run}: parts missing; recorded as error with the parts that arrived");
            }
            Ok(i32::from(rows.iter().any(crate::replay::ReplayRow::failed)))
        }
    }
}

/// The database pool and the worker's bucket, for `archive` and `restore`.
async fn history_services(
    settings: &Settings,
) -> anyhow::Result<(sqlx::PgPool, crate::s3::ArtifactStore)> {
    let pool = crate::db::connect(&settings.database).await?;
    let client = crate::s3::build_client(&settings.s3).await;
    let store = crate::s3::ArtifactStore::new(client, &settings.s3, settings.s3.bucket()?);
    Ok((pool, store))
}

fn run_extract(
    settings: &Settings,
    file: &std::path::Path,
    exit_code: Option<i32>,
    metrics: Option<&std::path::Path>,
    details: bool,
) -> anyhow::Result<i32> {
    let uri = file.display().to_string();
    let bytes = crate::artifact::read_maybe_gzip(
        &uri,
        file,
        settings.fetch.max_summary_bytes,
        settings.fetch.max_inflated_bytes,
    )?;
    let summary = parse_summary(&bytes).with_context(|| format!("Failed to read {uri}"))?;
    let samples = match metrics {
        Some(path) => {
            let reader =
                crate::artifact::open_lines_capped(path, settings.fetch.max_samples_inflated_bytes)
                    .with_context(|| format!("Failed to open {}", path.display()))?;
            Some(collect_samples_with(
                reader,
                &wanted_samples(&summary),
                &settings.fetch.sample_limits(),
            )?)
        }
        None => None,
    };
    let extraction = extract(&summary, exit_code, samples.as_ref());
    let out = if details {
        serde_json::to_value(&extraction)?
    } else {
        serde_json::to_value(&extraction.columns)?
    };
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(0)
}
