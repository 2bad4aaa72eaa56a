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
    let fetcher = Fetcher::new(&settings.fetch, client)?.with_roots(extra_roots);
    Ok(Ingestor::new(
        pool,
        store,
        fetcher,
        settings.s3.inline_summary_max_bytes,
    ))
}
