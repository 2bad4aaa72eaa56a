//! Shared test helpers: real PostgreSQL (a fresh database per test via `#[sqlx::test]`),
//! the real S3-compatible server started by `scripts/services-up.sh`, and the fixtures.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

use k6_ingest::artifact::Fetcher;
use k6_ingest::config::Settings;
use k6_ingest::ingest::{IngestContext, Ingestor};
use k6_ingest::message::RunCompleted;
use k6_ingest::s3::{ArtifactStore, build_client};
use sqlx::PgPool;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/k6")
}

pub fn fixture_dir(version: &str, case: &str) -> PathBuf {
    fixtures().join(version).join(case)
}

/// Every fixture run directory, as (version, case).
pub fn all_fixture_runs() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for v in std::fs::read_dir(fixtures()).unwrap() {
        let v = v.unwrap();
        let name = v.file_name().to_string_lossy().into_owned();
        if !name.starts_with('v') || !v.file_type().unwrap().is_dir() {
            continue;
        }
        for c in std::fs::read_dir(v.path()).unwrap() {
            let c = c.unwrap();
            if c.path().join("message.json").is_file() {
                out.push((name.clone(), c.file_name().to_string_lossy().into_owned()));
            }
        }
    }
    out.sort();
    out
}

pub fn message(dir: &Path) -> RunCompleted {
    RunCompleted::decode(&std::fs::read(dir.join("message.json")).unwrap()).unwrap()
}

/// Settings from the environment `scripts/services-up.sh` exports, with an S3 prefix of
/// the test's own so parallel tests never share keys.
pub fn settings(prefix: &str) -> Settings {
    k6_ingest::telemetry::init_for_test();
    let mut s = Settings::load(None).expect("settings");
    assert!(
        s.s3.endpoint.is_some() && s.s3.bucket.is_some(),
        "K6_INGEST__S3__ENDPOINT / K6_INGEST__S3__BUCKET not set: run `eval \"$(scripts/services-up.sh)\"` first"
    );
    // A bucket per test, no prefix: the test server (s3s-fs) keeps per-object metadata
    // in files named after the base64 of bucket and key, which caps keys near 120 bytes
    // for multipart uploads there (S3 itself allows 1024).
    let _ = prefix;
    s.s3.bucket = Some(format!(
        "t-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    s.s3.prefix = String::new();
    s
}

pub async fn store(s: &Settings) -> ArtifactStore {
    let client = build_client(&s.s3).await;
    let bucket = s.s3.bucket().unwrap();
    if client.head_bucket().bucket(bucket).send().await.is_err() {
        client.create_bucket().bucket(bucket).send().await.unwrap();
    }
    ArtifactStore::new(client, &s.s3, s.s3.bucket().unwrap())
}

pub async fn ingestor(pool: &PgPool, s: &Settings) -> Ingestor {
    let store = store(s).await;
    let fetcher = Fetcher::new(&s.fetch, Some(store.client().clone()))
        .unwrap()
        .with_roots(vec![fixtures()])
        .with_s3_sources(s.s3.sources().unwrap());
    Ingestor::new(pool.clone(), store, fetcher, s.s3.inline_summary_max_bytes)
}

pub fn ctx(dir: &Path) -> IngestContext {
    IngestContext {
        base_dir: Some(dir.to_path_buf()),
    }
}

/// Reads a whole S3 object.
pub async fn get_object(store: &ArtifactStore, key: &str) -> Vec<u8> {
    let out = store
        .client()
        .get_object()
        .bucket(store.bucket())
        .key(key)
        .send()
        .await
        .unwrap();
    out.body.collect().await.unwrap().into_bytes().to_vec()
}

/// Row counts of every table the worker writes, for "nothing changed" assertions.
pub async fn table_digest(pool: &PgPool) -> Vec<(String, i64, String)> {
    let mut out = Vec::new();
    for table in [
        "runs",
        "k6_performance_runs",
        "k6_metrics_history",
        "k6_threshold_results",
        "k6_check_results",
    ] {
        let (n, md5): (i64, Option<String>) = sqlx::query_as(&format!(
            "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM {table} t"
        ))
        .fetch_one(pool)
        .await
        .unwrap();
        out.push((table.to_string(), n, md5.unwrap_or_default()));
    }
    out
}

/// Copies a fixture run directory somewhere a test may change it.
pub fn copy_fixture(version: &str, case: &str) -> tempfile::TempDir {
    let src = fixture_dir(version, case);
    let dst = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.path().join(e.file_name())).unwrap();
    }
    dst
}
