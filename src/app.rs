//! Builds the shared pieces (database pool, S3 store, fetcher, ingestor) from settings.

use std::path::PathBuf;

use crate::artifact::Fetcher;
use crate::config::Settings;
use crate::ingest::{DryRun, Ingestor};
use crate::s3::{ArtifactStore, build_client};

/// The ingestor of `consume` and `replay`: PostgreSQL and the S3 bucket are required,
/// and a missing setting fails here, naming it.
pub async fn build_ingestor(
    settings: &Settings,
    extra_roots: Vec<PathBuf>,
) -> anyhow::Result<Ingestor> {
    let pool = crate::db::connect(&settings.database).await?;
    let client = build_client(&settings.s3).await;
    let store = ArtifactStore::new(client.clone(), &settings.s3, settings.s3.bucket()?);
    let fetcher = fetcher(settings, Some(client), extra_roots)?;
    Ok(
        Ingestor::new(pool, store, fetcher, settings.s3.inline_summary_max_bytes)
            .with_prepared_statements(settings.database.prepared_statements)
            .with_summary_limits(settings.summary_limits())
            .with_part_wait(std::time::Duration::from_secs(
                settings.ingest.part_wait_secs,
            )),
    )
}

/// `replay --dry-run`: fetch and extract only, so neither PostgreSQL nor a bucket is
/// needed; an S3 client is built only when S3 is configured (for `s3://` artifacts).
pub async fn build_dry_run(
    settings: &Settings,
    extra_roots: Vec<PathBuf>,
) -> anyhow::Result<DryRun> {
    let s3_configured = settings.s3.bucket.as_deref().is_some_and(|b| !b.is_empty());
    let client = if s3_configured {
        Some(build_client(&settings.s3).await)
    } else {
        None
    };
    let fetcher = fetcher(settings, client, extra_roots)?;
    Ok(DryRun::new(fetcher, settings.s3.inline_summary_max_bytes)
        .with_summary_limits(settings.summary_limits()))
}

fn fetcher(
    settings: &Settings,
    client: Option<aws_sdk_s3::Client>,
    extra_roots: Vec<PathBuf>,
) -> anyhow::Result<Fetcher> {
    Ok(Fetcher::new(&settings.fetch, client)?
        .with_roots(extra_roots)
        .with_s3_sources(settings.s3.sources()?))
}

/// A token cancelled on SIGTERM (Kubernetes) or Ctrl-C, for the long-running commands.
pub fn shutdown_on_signals() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            _ = ctrl_c => tracing::info!("interrupt received; shutting down"),
            () = term => tracing::info!("SIGTERM received; shutting down"),
        }
        cancel.cancel();
    });
    token
}
