//! Builds the shared pieces (database pool, S3 store, fetcher, ingestor) from settings.

use std::path::PathBuf;

use crate::artifact::Fetcher;
use crate::config::Settings;
use crate::ingest::Ingestor;
use crate::s3::{ArtifactStore, build_client};

/// What a command needs; each missing setting fails here, naming the setting.
#[derive(Debug, Clone, Copy)]
pub struct Needs {
    pub database: bool,
    pub s3: bool,
}

pub async fn build_ingestor(
    settings: &Settings,
    needs: Needs,
    extra_roots: Vec<PathBuf>,
) -> anyhow::Result<Ingestor> {
    let pool = if needs.database || settings.database.url.is_some() {
        Some(crate::db::connect(&settings.database).await?)
    } else {
        None
    };
    let s3_configured = settings.s3.bucket.as_deref().is_some_and(|b| !b.is_empty());
    let client = if needs.s3 || s3_configured {
        Some(build_client(&settings.s3).await)
    } else {
        None
    };
    let store = match (&client, needs.s3 || s3_configured) {
        (Some(c), true) => Some(ArtifactStore::new(
            c.clone(),
            &settings.s3,
            settings.s3.bucket()?,
        )),
        _ => None,
    };
    let fetcher = Fetcher::new(&settings.fetch, client)?
        .with_roots(extra_roots)
        .with_s3_sources(settings.s3.sources()?);
    Ok(
        Ingestor::new(pool, store, fetcher, settings.s3.inline_summary_max_bytes)
            .with_prepared_statements(settings.database.prepared_statements)
            .with_summary_limits(settings.summary_limits())
            .with_part_wait(std::time::Duration::from_secs(
                settings.ingest.part_wait_secs,
            )),
    )
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
